"""configs/llava15_siglip.py validates against a composed import for both phases, and its model
section is the imported one (so the config cannot disagree with the weights)."""
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from test_vlm import _text_config, _vision_config
from vlm_jax import config as config_lib
from vlm_jax.cli import main as cli_main

CONFIG = "configs/llava15_siglip.py"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava15")
    torch.manual_seed(0)
    transformers.SiglipVisionModel(_vision_config()).save_pretrained(tmp / "siglip")
    transformers.Qwen2ForCausalLM(_text_config("qwen2", tie=True)).save_pretrained(tmp / "llm")
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp / "llm" / "tokenizer.json"))
    assert cli_main(["import-hf", "--vision", str(tmp / "siglip"), "--text", str(tmp / "llm"),
                     "--out", str(tmp / "base")]) == 0
    (tmp / "data.json").write_text(json.dumps([]))
    return tmp


@pytest.mark.parametrize("phase", ["align", "instruct"])
def test_llava15_config_validates_on_an_import(imported, phase):
    arg = (f"phase={phase},model={imported / 'base'},data={imported / 'data.json'},"
           f"images={imported},seq_len=256")
    run = config_lib.build_run_config(config_lib.load_config_file(f"{CONFIG}:{arg}"), num_devices=8)
    saved = json.loads((imported / "base" / "config.json").read_text())["model"]
    assert run.model.llm.family == saved["llm"]["family"] == "qwen2"
    assert run.model.image_token_id == saved["image_token_id"]
    assert run.train.phase.name == phase and run.train.init_from.path.endswith("base")
    assert run.data.template == ("plain" if phase == "align" else "qwen2")
    assert run.data.batch_size == (256 if phase == "align" else 128)


def test_llava15_config_names_a_missing_argument(imported):
    with pytest.raises(ValueError, match="argument data=... is required"):
        config_lib.load_config_file(f"{CONFIG}:phase=align,model={imported / 'base'}")
