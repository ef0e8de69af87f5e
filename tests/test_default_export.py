"""The embedded default leaves JAX: a model of the shapes recipe's exact architecture
(configs/shapes/config.py: pixel_shuffle projector with input_norm and pos_embed, patch
features, Llama decoder) and its tokenizer, exported with `vlm-jax export-hf` (format auto ->
custom), answers the recipe's held-out questions through transformers alone (AutoProcessor, its
chat template, generate) exactly as `vlm-jax generate` does. (Issue "nothing lost", Why /
Exported models do not behave like ours: the export had no processor default, chat template or
stop tokens, and the embedded default could not be exported at all.)"""
import json
import os

import jax
import pytest
from PIL import Image

from configs.shapes import config as recipe
from configs.shapes.eval_exported import transformers_answers
from vlm_jax import model_dir
from vlm_jax.cli import main as cli_main
from vlm_jax.config import from_dict
from vlm_jax.data.shapes_tokenizer import fit_shapes_tokenizer
from vlm_jax.eval.vqa import shapes_vqa_items
from vlm_jax.models.vlm import VLMConfig, init_params

NUM_PER_TYPE = 2
MAX_NEW_TOKENS = 6


@pytest.mark.slow
@pytest.mark.parity
def test_the_exported_default_answers_held_out_questions_as_vlm_jax_generate(tmp_path, capsys):
    config = from_dict(VLMConfig, recipe.model_config(), "model")
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(3))
    tokenizer = fit_shapes_tokenizer(300, 0, recipe.VOCAB_SIZE, "minimal",
                                     recipe.WORLDS["recipe"])
    ckpt = str(tmp_path / "model")
    model_dir.save_model(ckpt, config, params, tokenizer,
                         data={"template": "minimal", "pad_to_square": False})
    out = str(tmp_path / "exported")
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", out]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "vlm_jax"

    items = shapes_vqa_items("test", NUM_PER_TYPE, recipe.IMAGE_SIZE, recipe.QUESTION_TYPES,
                             world=recipe.WORLDS["recipe"])
    requests = tmp_path / "requests.jsonl"
    with open(requests, "w") as f:
        for index, item in enumerate(items):
            path = tmp_path / f"scene{index}.png"
            Image.fromarray(item.image).save(path)
            f.write(json.dumps({"image": str(path), "prompt": item.question}) + "\n")
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", ckpt, "--requests", str(requests),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    ours = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]

    # What `python -m configs.shapes.eval_exported` runs on the trained default (README table).
    theirs = transformers_answers(out, items, MAX_NEW_TOKENS)
    assert len(ours) == len(items) == NUM_PER_TYPE * len(recipe.QUESTION_TYPES)
    assert [t.strip() for t in theirs] == [o.strip() for o in ours]
