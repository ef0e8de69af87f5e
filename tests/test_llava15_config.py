"""configs/llava15_siglip.py validates against a composed import for both phases, and its model
section is the imported one (so the config cannot disagree with the weights)."""
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from vlm_jax.train import run_config as config_lib
from vlm_jax.cli import main as cli_main

CONFIG = "configs/llava15_siglip.py"


@pytest.fixture(scope="module")
def imported(hf_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava15")
    torch.manual_seed(0)
    transformers.SiglipVisionModel(hf_tiny.vision()).save_pretrained(tmp / "siglip")
    transformers.Qwen2ForCausalLM(hf_tiny.text("qwen2", tie=True)).save_pretrained(tmp / "llm")
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
    # 16 image tokens: align 3 examples per 256-token row (86 rows, rounded up to whole rows
    # on the 8 devices), instruct 1 (expected text 512)
    assert run.data.batch_size == (88 if phase == "align" else 128)


def test_llava15_config_names_a_missing_argument(imported):
    with pytest.raises(ValueError, match="give exactly one of data=FILE.json"):
        config_lib.load_config_file(f"{CONFIG}:phase=align,model={imported / 'base'}")


def test_llava15_batch_in_examples_sets_the_rows(imported):
    base = f"model={imported / 'base'},data={imported / 'data.json'},images={imported}"
    run = config_lib.build_run_config(config_lib.load_config_file(
        f"{CONFIG}:phase=align,{base},seq_len=256"), num_devices=8)
    # 16 image tokens + ~64 text tokens: 3 examples per 256-token row -> 256 examples = 86 rows,
    # rounded up to whole rows on each of the 8 devices
    assert run.data.batch_size == 88 and run.train.epochs == 1 and run.train.steps is None
    assert run.data.too_long == "truncate" and run.data.pad_to_square
    assert run.train.optimizer.warmup_ratio == 0.03
    run = config_lib.build_run_config(config_lib.load_config_file(
        f"{CONFIG}:phase=instruct,{base},batch=64,examples_per_row=2,processes=4"), num_devices=8,
        process_count=4)
    assert run.data.batch_size == 8  # 32 rows over 4 processes


def test_llava15_webdataset_and_tfds_forms_need_no_data_or_images(imported):
    model = f"model={imported / 'base'}"
    run = config_lib.build_run_config(config_lib.load_config_file(
        f"{CONFIG}:phase=align,{model},webdataset={imported}/shard-{{0..3}}.tar,steps=50"),
        num_devices=8)
    (source,) = run.data.sources
    assert source.kind == "webdataset" and run.train.steps == 50 and run.train.epochs is None
    config = config_lib.load_config_file(
        f"{CONFIG}:phase=align,{model},tfds=coco_captions,tfds_features=image:image;caption:caption")
    assert config.data.sources[0]["options"]["features"] == {"image": "image", "caption": "caption"}
    for arg, message in (("webdataset=x.tar", "give steps=N"), ("tfds=coco", "tfds_features"),
                         (f"data={imported / 'data.json'}", "needs images=DIR"),
                         ("data=x.json,images=y,webdataset=z.tar", "exactly one of")):
        with pytest.raises(ValueError, match=message):
            config_lib.load_config_file(f"{CONFIG}:phase=align,{model},{arg}")
