"""`vlm-jax export-hf --format custom`: compositions HF LLaVA cannot hold (pixel_shuffle with
input_norm / pos_embed, the resampler, linear; vision features from any layer) export as
transformers remote code that loads with no missing or unexpected keys, computes our logits and
greedy answers (transformers' generate with its KV cache), and loads in a Python that has neither
vlm_jax nor jax."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_jax
from vlm_jax import model_dir
from vlm_jax.cli import main as cli_main
from vlm_jax.convert import exporter, hf_custom
from vlm_jax.data.images import preprocess_image
from vlm_jax.data.tokenizer import Tokenizer as OurTokenizer
from vlm_jax.errors import ConversionError
from vlm_jax.inference.generate import greedy_generate
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import architecture_only, init_params

VOCAB = 32
IMAGE_TOKEN_ID = VOCAB - 1
WORDS = ["<unk>", "<s>", "</s>", "<pad>",
         "What", "is", "in", "this", "picture", "?", "A", "red", "circle", "."]
ANSWER_TOKENS = 6
# The embedded default's projector (configs/shapes/config.py), at the tiny model's width.
PIXEL_SHUFFLE = ProjectorConfig(type="pixel_shuffle", pixel_shuffle_factor=2, mlp_depth=2,
                                hidden_dim=48, input_norm=True, pos_embed=True)
RESAMPLER = ProjectorConfig(type="resampler", num_queries=3, resampler_depth=2,
                            resampler_heads=2, input_norm=True)
# case: (family, projector, vision feature layer, feature select, pad to square, feature post-norm
#        [, cross-attention layers: model.fusion="cross_attention"])
CASES = {
    "pixel_shuffle-llama": ("llama", PIXEL_SHUFFLE, 0, "full", True, False),
    "resampler-llama": ("llama", RESAMPLER, -1, "full", False, False),
    "pixel_shuffle-qwen2": ("qwen2", PIXEL_SHUFFLE, 1, "full", False, True),
    "resampler-gemma": ("gemma", RESAMPLER, 0, "default", True, False),
    "linear-gemma": ("gemma", ProjectorConfig(type="linear", pos_embed=True), -2, "default", False,
                     False),
    "cross_attention-llama": ("llama", PIXEL_SHUFFLE, -1, "full", False, False, (0, 1)),
    "cross_attention-gemma": ("gemma", ProjectorConfig(type="mlp2x_gelu"), 0, "full", True, False,
                              (1,)),
}


def _tokenizer(directory):
    """Word level: the probe words, fillers, `<image>` = 31; BOS <s>, EOS </s>."""
    os.makedirs(directory, exist_ok=True)
    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(VOCAB - 1 - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<s>", "</s>", "<pad>", "<image>")])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return OurTokenizer.from_path(str(directory))


def _model_dir(tiny_vlm_config, tmp_path, case):
    """A trained-looking model directory: every tensor moved off its initial value (scaled by
    1 +- 0.5 and shifted by +-0.1 at random: norm scales off 1, biases off 0), the `minimal`
    chat template recorded as training does."""
    family, projector, feature_layer, select, pad, post_norm, *cross = CASES[case]
    fusion = dict(fusion="cross_attention", cross_attention_layers=cross[0]) if cross else {}
    config = tiny_vlm_config(
        family, vocab_size=VOCAB, projector=projector, vision_feature_select=select,
        vision=dict(image_size=32, depth=2, feature_layer=feature_layer, posemb="sincos2d",
                    use_head=True, feature_post_norm=post_norm), **fusion)
    params = model_dir.numpy_params(jax.jit(lambda key: init_params(config, key))(
        jax.random.key(0)))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: (x * (1 + 0.5 * rng.standard_normal(x.shape))
                                     + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                          params)
    ckpt = tmp_path / f"model_{case}"
    model_dir.save_model(str(ckpt), config, params, _tokenizer(tmp_path / "tok"),
                         data={"template": "minimal", "pad_to_square": pad})
    return str(ckpt)


def _export(ckpt, out, *flags):
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out), *flags]) == 0
    return str(out)


def _image(seed, size=(40, 50)):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8))


def _chat_inputs(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=image, return_tensors="pt")


def _our_greedy(ours, input_ids, pixel_values):
    """Our KV-cache greedy decoding of ANSWER_TOKENS tokens, no stop token."""
    images = np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)[:, None]
    ids = np.asarray(input_ids, np.int32)
    tokens, lengths = greedy_generate(ours.config, ours.params, ids, np.array([ids.shape[1]]),
                                      images, ANSWER_TOKENS, ())
    assert lengths[0] == ANSWER_TOKENS
    return tokens[0].tolist()


@pytest.fixture(scope="module")
def default_export(tiny_vlm_config, tmp_path_factory):
    """The embedded default's composition (pixel_shuffle + input_norm + pos_embed, llama,
    feature_layer=0) exported with --format auto."""
    tmp_path = tmp_path_factory.mktemp("default_export")
    ckpt = _model_dir(tiny_vlm_config, tmp_path, "pixel_shuffle-llama")
    return ckpt, _export(ckpt, tmp_path / "exported", "--format", "auto")


def _check_parity(ckpt, out):
    """Logits on a padded two-image batch and greedy tokens: ours vs the loaded export."""
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "vlm_jax"
    assert config["architectures"] == [hf_custom.ARCHITECTURE]
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_vlm_jax.")
    for name in hf_custom.CODE_FILES:
        assert os.path.exists(os.path.join(out, name)), name
    model, info = AutoModelForImageTextToText.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    model.eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    ours = vlm_jax.load(ckpt)
    per_image = ours.config.tokens_per_image
    assert config["image_seq_length"] == per_image

    images = [_image(3), _image(4, (50, 36))]
    batch = processor(images=images, text=["<image> What is this ?", "A red <image> circle ."],
                      padding=True, return_tensors="np")
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert ((ids == IMAGE_TOKEN_ID).sum(1) == per_image).all()  # <image> expanded per image
    want_pixels = np.stack([preprocess_image(np.asarray(im), ours.config.vision.image_size,
                                             pad_to_square=ours.pad_to_square) for im in images])
    np.testing.assert_allclose(pixels, want_pixels.transpose(0, 3, 1, 2), atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(pixels)).logits.numpy()
    real = mask.astype(bool)
    logit_diff = float(np.abs(ours.logits(ids, pixels, mask)[real] - theirs[real]).max())
    assert logit_diff <= 1e-4

    inputs = _chat_inputs(processor, _image(5))
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=ANSWER_TOKENS,
                                   eos_token_id=None)  # no stop: ANSWER_TOKENS tokens exactly
    theirs_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
    assert theirs_tokens == _our_greedy(ours, inputs["input_ids"], inputs["pixel_values"])
    print(f"max |logit diff| {logit_diff:.3g}, greedy {theirs_tokens}")
    return logit_diff


def test_default_composition_exports_as_custom_with_parity(default_export):
    ckpt, out = default_export
    assert _check_parity(ckpt, out) <= 1e-4
    _assert_imports_back(ckpt, out)


def _assert_imports_back(ckpt, out):
    """Why / a custom export could not be read back: `import-hf --hf-dir` of it gives the same
    config and bit-identical params (so an exported model can come home, e.g. to fine-tune). A
    fixed sin-cos position table comes back as HF SigLIP's learned one (the same values)."""
    back = os.path.join(os.path.dirname(out), "imported_back")
    assert cli_main(["import-hf", "--hf-dir", out, "--out", back]) == 0
    config, params, _ = model_dir.load_model(ckpt)
    config_back, params_back, tokenizer = model_dir.load_model(back)
    expected = architecture_only(config)
    if expected.vision.posemb != "learn":
        expected = dataclasses.replace(
            expected, vision=dataclasses.replace(expected.vision, posemb="learn"))
        params_back["vision_tower"] = dict(params_back["vision_tower"])
        params_back["vision_tower"].pop("pos_embedding")
    assert config_back == expected and tokenizer is not None
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params_back)


@pytest.mark.parametrize("case", [c for c in CASES if c != "pixel_shuffle-llama"])
def test_other_compositions_export_as_custom_with_parity(tiny_vlm_config, tmp_path, case, capsys):
    ckpt = _model_dir(tiny_vlm_config, tmp_path, case)
    out = _export(ckpt, tmp_path / "exported")  # --format auto
    said = capsys.readouterr().out
    assert hf_custom.ARCHITECTURE in said and "the same greedy answer (" in said, said
    assert _check_parity(ckpt, out) <= 1e-4
    _assert_imports_back(ckpt, out)


# Runs in a fresh interpreter that cannot import vlm_jax, jax or flax.
_STANDALONE = r"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vlm_jax", "jax", "jaxlib", "flax"):
            raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, Refuse())
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
out = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True,
                                                    dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
calls = []
def record(module, args, kwargs):
    calls.append({"pixel_values": kwargs.get("pixel_values") is not None,
                  "new_tokens": int(kwargs["input_ids"].shape[1])})
model.register_forward_pre_hook(record, with_kwargs=True)
image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), np.uint8))
messages = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What is in this picture?"}]}]
inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                   images=image, return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=int(sys.argv[2]),
                               eos_token_id=None)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("vlm_jax", "jax", "flax"))
assert not loaded, loaded
print(json.dumps({"tokens": generated[0, inputs["input_ids"].shape[1]:].tolist(),
                  "input_ids": inputs["input_ids"].tolist(),
                  "pixel_values": inputs["pixel_values"].tolist(), "calls": calls}))
"""


def test_custom_export_loads_and_generates_without_vlm_jax_or_jax(default_export, tmp_path):
    ckpt, out = default_export
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", _STANDALONE, out, str(ANSWER_TOKENS)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # the prefill reads the image; each later step one new token, the image through the cache
    calls = result["calls"]
    assert len(calls) == ANSWER_TOKENS and calls[0]["pixel_values"], calls
    assert all(not c["pixel_values"] and c["new_tokens"] == 1 for c in calls[1:]), calls
    ours = _our_greedy(vlm_jax.load(ckpt), np.array(result["input_ids"]),
                       np.array(result["pixel_values"], np.float32))
    assert result["tokens"] == ours


def test_format_llava_refuses_what_llava_cannot_hold(tiny_vlm_config, tmp_path, capsys):
    ckpt = _model_dir(tiny_vlm_config, tmp_path, "pixel_shuffle-llama")
    out = tmp_path / "llava"
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", str(out),
                     "--format", "llava"]) == 2
    err = capsys.readouterr().err
    assert "model.projector.type='pixel_shuffle'" in err and "--format custom" in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["model_pixel_shuffle-llama",
                                                                  "tok"]
    # from the config alone, before any weight is read; each field named
    for projector, field in ((ProjectorConfig(type="resampler"), "model.projector.type"),
                             (ProjectorConfig(input_norm=True), "model.projector.input_norm"),
                             (ProjectorConfig(pos_embed=True), "model.projector.pos_embed")):
        config = tiny_vlm_config(vocab_size=VOCAB, projector=projector)
        with pytest.raises(ConversionError, match=field):
            exporter.export_params(config, {}, None, str(tmp_path / "x"), format="llava")
        assert exporter.resolve_format(config, "auto") == "custom"
    plain = tiny_vlm_config(vocab_size=VOCAB)
    assert exporter.resolve_format(plain, "auto") == "llava"
    assert exporter.resolve_format(plain, "custom") == "custom"
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", str(out), "--part", "vision",
                     "--format", "custom"]) == 2
    assert "--format custom is for --part vlm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not out.exists()


def test_a_wrong_projector_tensor_fails_the_custom_self_check(tiny_vlm_config, tmp_path,
                                                              monkeypatch, capsys):
    """A converter bug that transformers loads without complaint (a square weight written
    untransposed) must fail the export, exit 3, and leave nothing behind."""
    ckpt = _model_dir(tiny_vlm_config, tmp_path, "resampler-llama")
    right = hf_custom.projector_params_to_hf

    def transposed_q(params, config):
        sd = right(params, config)
        key = hf_custom.PROJECTOR_PREFIX + "blocks.0.q.weight"
        sd[key] = np.ascontiguousarray(sd[key].T)
        return sd

    monkeypatch.setattr(hf_custom, "projector_params_to_hf", transposed_q)
    out = tmp_path / "bad"
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "self-check FAILED" in err and "custom-format logits" in err, err
    assert "nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == ["model_resampler-llama", "tok"]  # no staging left


def test_bf16_custom_export_keeps_the_fixed_position_table_exact(tiny_vlm_config, tmp_path,
                                                                 monkeypatch, capsys):
    """bf16 weights, but the sincos2d table (no weight of ours, computed in f32) stays f32: the
    self-check's same-weights comparison (f32 compute, 1e-4) holds, and the model still loads
    in bf16."""
    from safetensors.numpy import load_file
    # What is tested is the same-weights comparison; the separate bound on how far bf16 rounding
    # moves the outputs (2% of their scale) is for real models: this tiny random net, its
    # weights perturbed at random, amplifies rounding to ~2-3%.
    monkeypatch.setattr(exporter, "BF16_RELATIVE_TOLERANCE", 0.1)
    ckpt = _model_dir(tiny_vlm_config, tmp_path, "pixel_shuffle-llama")
    out = _export(ckpt, tmp_path / "bf16", "--dtype", "bfloat16")
    assert "bf16 rounding moves outputs by" in capsys.readouterr().out
    dtypes = {k: v.dtype.name for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    table = "vision_tower.embeddings.position_embedding.weight"
    assert dtypes.pop(table) == "float32" and set(dtypes.values()) == {"bfloat16"}
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert model.dtype == torch.bfloat16  # the config's dtype
    inputs = _chat_inputs(AutoProcessor.from_pretrained(out, trust_remote_code=True), _image(5))
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=3, eos_token_id=None)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_the_export_line_names_what_no_transformers_vlm_holds():
    params = {"vision_tower": {}, "projector": {}, "llm": {}, "text_tower": {}, "itm_head": {}}
    assert exporter.not_exported(params, "vlm") == ("text_tower", "itm_head")
    assert exporter.not_exported(params, "llm") == ()
    result = exporter.ExportResult("out", "vlm", "float32", 0.0, 1e-4, None, None, True,
                                   left_out=("text_tower", "itm_head"))
    assert "not exported (no transformers VLM has them; they stay in the model directory): " \
           "text_tower/, itm_head/" in exporter.describe(result)
    assert "not exported" not in exporter.describe(dataclasses.replace(result, left_out=()))
