"""`vlm-jax export-hf` against transformers: the exported LLaVA / SigLIP directories load with no
missing or unexpected keys and compute what the original HF model (or our model) computes; the
processor expands `<image>` for our model; HF -> import -> export -> HF is bit-exact."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (AutoProcessor, LlavaConfig, LlavaForConditionalGeneration,
                          SiglipVisionModel)

import vlm_jax
from vlm_jax import model_dir
from vlm_jax.cli import main as cli_main
from vlm_jax.convert import exporter, hf_llava
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import init_params

VOCAB = 96  # hf_tiny's
IMAGE_TOKEN_ID = 95
WORDS = ["<unk>", "<s>", "</s>", "<pad>",
         "What", "is", "in", "this", "picture", "?", "A", "red", "circle", "."]


def _save_tokenizer(directory, with_image=True):
    """Word-level tokenizer: the probe words, fillers up to id 94, `<image>` = 95."""
    size = VOCAB - 1 if with_image else VOCAB
    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(size - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_image:
        tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.save(os.path.join(directory, "tokenizer.json"))


def _randomize_norms(model):
    with torch.no_grad():  # non-trivial norms so the 1+w / w conventions are exercised
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def _hf_llava(hf_tiny, tmp_path, family, tie):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=hf_tiny.vision(layers=2),
                         text_config=hf_tiny.text(family, tie),
                         image_token_index=IMAGE_TOKEN_ID, image_seq_length=16,
                         vision_feature_select_strategy="full", vision_feature_layer=-2,
                         projector_hidden_act="gelu", tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize_norms(model)
    hf_dir = tmp_path / f"hf_{family}"
    model.save_pretrained(hf_dir)
    _save_tokenizer(hf_dir)
    return model, str(hf_dir)


def _import(hf_dir, out):
    assert cli_main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(out)]) == 0
    return str(out)


def _export(ckpt, out, *extra):
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 0
    return str(out)


def _load_exported(out, **kw):
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True, **kw)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def _processor_inputs(out):
    """input_ids / pixel_values from the exported AutoProcessor on a random image."""
    from PIL import Image
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, transformers.LlavaProcessor)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), np.uint8))
    texts = ["<image> What is this ?", "A red <image> circle ."]
    batch = processor(images=[image, image], text=texts,
                      padding=True, return_tensors="np")
    return batch["input_ids"], batch["attention_mask"], batch["pixel_values"]


def _hf_logits(model, input_ids, attention_mask, pixel_values):
    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                     pixel_values=torch.tensor(pixel_values, dtype=model.dtype)
                     ).logits.float().numpy()


@pytest.mark.parity
@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("gemma", True)])
def test_export_parity_processor_and_round_trip(hf_tiny, tmp_path, family, tie):
    original, hf_dir = _hf_llava(hf_tiny, tmp_path, family, tie)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    out = _export(ckpt, tmp_path / "exported")

    # bit-exact round trip, with the key names transformers itself writes
    want, got = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key

    exported = _load_exported(out, dtype=torch.float32)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["image_seq_length"], config["vision_feature_select_strategy"],
            config["vision_feature_layer"], config["text_config"]["model_type"]) == (
        16, "full", -2, family)

    input_ids, attention_mask, pixel_values = _processor_inputs(out)
    assert ((input_ids == IMAGE_TOKEN_ID).sum(1) == 16).all()  # <image> expanded per image
    ours = vlm_jax.load(ckpt).logits(input_ids, pixel_values, attention_mask)
    want_logits = _hf_logits(original, input_ids, attention_mask, pixel_values)
    got_logits = _hf_logits(exported, input_ids, attention_mask, pixel_values)
    real = attention_mask.astype(bool)
    np.testing.assert_array_equal(got_logits[real], want_logits[real])  # identical weights
    np.testing.assert_allclose(ours[real], got_logits[real], atol=1e-4, rtol=0)


@pytest.mark.parity
def test_composed_import_exports(hf_tiny, tmp_path):
    """SigLIP + LLM + a fresh projector (and a vocabulary grown by `<image>`) -> HF LLaVA."""
    torch.manual_seed(0)
    vision_dir, text_dir = tmp_path / "siglip", tmp_path / "llm"
    SiglipVisionModel(hf_tiny.vision(layers=2)).save_pretrained(vision_dir)
    llm = transformers.Qwen2ForCausalLM(hf_tiny.text("qwen2", tie=False, vocab=VOCAB - 1))
    _randomize_norms(llm)
    llm.save_pretrained(text_dir)
    _save_tokenizer(text_dir, with_image=False)
    ckpt = tmp_path / "composed"
    assert cli_main(["import-hf", "--vision", str(vision_dir), "--text", str(text_dir),
                     "--out", str(ckpt)]) == 0
    out = _export(ckpt, tmp_path / "exported")
    exported = _load_exported(out, dtype=torch.float32)
    input_ids, attention_mask, pixel_values = _processor_inputs(out)
    ours = vlm_jax.load(str(ckpt)).logits(input_ids, pixel_values, attention_mask)
    real = attention_mask.astype(bool)
    got = _hf_logits(exported, input_ids, attention_mask, pixel_values)
    np.testing.assert_allclose(ours[real], got[real], atol=1e-4, rtol=0)
    # the LLM and the vision tower reach the export unchanged
    sd = load_file(os.path.join(out, "model.safetensors"))
    for key, value in llm.state_dict().items():
        if key == "model.embed_tokens.weight":
            np.testing.assert_array_equal(sd["language_model." + key][:VOCAB - 1], value.numpy())
        elif key != "lm_head.weight":
            np.testing.assert_array_equal(sd["language_model." + key], value.numpy())


@pytest.mark.parity
def test_part_vision_exports_siglip_vision_model(hf_tiny, tmp_path):
    original, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama", tie=False)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    out = _export(ckpt, tmp_path / "vision", "--part", "vision")
    exported, info = SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    pixels = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)),
                          dtype=torch.float32)
    with torch.no_grad():
        want = original.model.vision_tower(pixel_values=pixels).last_hidden_state
        got = exported.eval()(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _config_with_projector(tiny_vlm_config, projector, **options):
    """The tiny VLM with a 32-id vocabulary (<image> = 31) and the given projector."""
    return tiny_vlm_config(vocab_size=32, projector=ProjectorConfig(
        type=projector, num_queries=4, resampler_depth=1, resampler_heads=2, **options))


def test_projectors_llava_cannot_express_are_refused(tiny_vlm_config, tmp_path, capsys):
    config = _config_with_projector(tiny_vlm_config, "pixel_shuffle")
    ckpt = tmp_path / "ckpt"
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    model_dir.save_model(str(ckpt), config, params)
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"),
                     "--format", "llava"]) == 2
    err = capsys.readouterr().err
    assert "projector type 'pixel_shuffle'" in err and "LLaVA" in err
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")
    for projector in ("resampler", "linear"):  # refused from the config alone, before any weight
        with pytest.raises(ValueError, match=f"projector type {projector!r}"):
            exporter.export_params(_config_with_projector(tiny_vlm_config, projector), {}, None,
                                   str(tmp_path / "y"), format="llava")
    for option in ("input_norm", "pos_embed"):  # an mlp2x_gelu LLaVA has no slot for these either
        with pytest.raises(ValueError, match=f"projector.{option}=True"):
            exporter.export_params(
                _config_with_projector(tiny_vlm_config, "mlp2x_gelu", **{option: True}), {}, None,
                str(tmp_path / "y"), format="llava")
    assert not os.path.exists(tmp_path / "y")


@pytest.mark.parity
def test_bf16_export_loads_and_stays_close(hf_tiny, tmp_path, capsys):
    original, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama", tie=False)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    out = _export(ckpt, tmp_path / "bf16", "--dtype", "bfloat16")
    assert "bf16 rounding moves outputs by" in capsys.readouterr().out
    f32_sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    for key, value in load_file(os.path.join(out, "model.safetensors")).items():
        assert value.dtype.name == "bfloat16", key
        np.testing.assert_array_equal(value, f32_sd[key].astype(value.dtype))  # rounded once
    exported = _load_exported(out)  # dtype from config.json
    assert exported.dtype == torch.bfloat16
    input_ids, attention_mask, pixel_values = _processor_inputs(out)
    want = _hf_logits(original, input_ids, attention_mask, pixel_values)
    got = _hf_logits(exported, input_ids, attention_mask, pixel_values)  # bf16 compute
    real = attention_mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() < 0.05 * max(1.0, np.abs(want).max())


def test_large_exports_are_sharded_with_an_index_and_import_back(hf_tiny, tmp_path, capsys):
    """Why / a 7B export in one safetensors file is not what the ecosystem expects: above
    --max-shard-size the weights go to model-0000i-of-0000n.safetensors with an index that
    transformers loads, and import-hf reads the shards back to the same params."""
    import json
    import jax
    from vlm_jax.model_dir import load_model
    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama", tie=False)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    out = _export(ckpt, tmp_path / "sharded", "--max-shard-size", "40KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    assert all(os.path.getsize(os.path.join(out, n)) <= 40_000 + 2**16 for n in shards)
    _load_exported(out)  # no missing / unexpected keys
    _, before, _ = load_model(ckpt)
    _, after, _ = load_model(_import(out, tmp_path / "again"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
    capsys.readouterr()
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "x"),
                     "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parity
def test_self_check_fails_loudly_on_a_wrong_tensor(hf_tiny, tmp_path, capsys, monkeypatch):
    """A converter bug (linear_2 written untransposed: same shape, wrong layout) loads in
    transformers without complaint; the self-check must catch it and the CLI exit non-zero."""
    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama", tie=False)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    right = hf_llava.projector_params_to_hf

    def transposed_linear_2(params, config, prefix=hf_llava.PROJECTOR_PREFIX):
        sd = right(params, config, prefix)
        sd[prefix + "linear_2.weight"] = np.ascontiguousarray(sd[prefix + "linear_2.weight"].T)
        return sd

    monkeypatch.setattr(hf_llava, "projector_params_to_hf", transposed_linear_2)
    assert cli_main(["export-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "bad")]) == 3
    err = capsys.readouterr().err
    assert "self-check FAILED" in err and "max |diff|" in err


@pytest.mark.parity
def test_lora_instruct_steps_export_with_adapters_merged(hf_tiny, tmp_path):
    """A few instruct steps with LoRA; the model that training hands over exports with parity."""
    from vlm_jax import sharding
    from vlm_jax.train import phases
    from vlm_jax.train.lora import LoraConfig
    from vlm_jax.train.optimizer import OptimizerConfig
    from vlm_jax.train.step import (TrainStepConfig, create_train_state, make_train_step,
                                    plan_training)

    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama", tie=False)
    ckpt = _import(hf_dir, tmp_path / "ckpt")
    config, params, tokenizer = model_dir.load_model(ckpt)
    base = model_dir.numpy_params(params)
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=3,
                                grad_clip_norm=None)
    phase = phases.PhaseConfig("instruct", lora=LoraConfig(rank=2, alpha=4.0))
    plan = plan_training(config, TrainStepConfig(phase=phase, optimizer=optimizer), mesh)
    state = create_train_state(plan, jax.random.key(1), params=base)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, IMAGE_TOKEN_ID, (2, 22)).astype(np.int32)
    ids[:, 1:17] = IMAGE_TOKEN_ID
    batch = dict(input_ids=ids, target_ids=np.roll(ids, -1, 1),
                 loss_mask=np.broadcast_to(np.arange(22) > 16, (2, 22)).astype(np.float32),
                 positions=np.broadcast_to(np.arange(22, dtype=np.int32), (2, 22)).copy(),
                 mask_ar=np.ones((2, 22), np.int32),
                 images=rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32))
    train_step = make_train_step(plan)
    for _ in range(3):
        state, _ = train_step(state, sharding.global_batch(batch, mesh))
    trained = model_dir.numpy_params(plan.model_params(state))
    # the adapters moved the LLM's kernels: the export must carry W + alpha/r * A @ B
    assert not np.array_equal(trained["llm"]["layers"]["attention"]["q"]["kernel"],
                              base["llm"]["layers"]["attention"]["q"]["kernel"])
    model_dir.save_model(str(tmp_path / "lora_model"), config, trained, tokenizer)
    out = _export(tmp_path / "lora_model", tmp_path / "exported")
    exported = _load_exported(out, dtype=torch.float32)
    input_ids, attention_mask, pixel_values = _processor_inputs(out)
    ours = vlm_jax.load(str(tmp_path / "lora_model")).logits(input_ids, pixel_values,
                                                              attention_mask)
    got = _hf_logits(exported, input_ids, attention_mask, pixel_values)
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(ours[real], got[real], atol=1e-4, rtol=0)


def _bf16_trained_dir(tiny_vlm_config, tmp_path):
    """A model directory saved from a config that computes in bf16 with full remat (the real
    recipe's run settings)."""
    config = tiny_vlm_config(vocab_size=32, dtype="bfloat16", param_dtype="float32",
                             remat_policy="full")
    ckpt = tmp_path / "trained"
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    vocab = {f"w{i}": i for i in range(31)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2", "pad_token": None}))
    from vlm_jax.data.tokenizer import Tokenizer as OurTokenizer
    model_dir.save_model(str(ckpt), config, params, OurTokenizer.from_path(str(tokenizer_dir)))
    return ckpt


@pytest.mark.parity
def test_a_model_trained_in_bf16_is_stored_as_its_architecture_and_exports(tiny_vlm_config,
                                                                             tmp_path):
    ckpt = _bf16_trained_dir(tiny_vlm_config, tmp_path)
    saved = json.load(open(ckpt / "config.json"))
    assert saved["model"]["dtype"] is None and saved["model"]["remat_policy"] is None
    assert saved["model"]["llm"]["dtype"] == "float32"
    assert saved["trained_with"] == {"dtype": "bfloat16", "remat_policy": "full"}
    assert model_dir.load_config(str(ckpt)).resolved("llm").dtype == "float32"
    assert vlm_jax.load(str(ckpt), dtype="bfloat16").config.resolved("llm").dtype == "bfloat16"
    # a directory written before run settings left the model section still loads as f32
    saved["model"].update(dtype="bfloat16", remat_policy="full")
    del saved["trained_with"]
    (ckpt / "config.json").write_text(json.dumps(saved))
    assert model_dir.load_config(str(ckpt)).resolved("llm").dtype == "float32"
    assert model_dir.load_trained_with(str(ckpt))["dtype"] == "bfloat16"
    result = exporter.export_hf(str(ckpt), str(tmp_path / "hf"))
    assert result.max_abs_diff <= exporter.F32_TOLERANCE


@pytest.mark.parity
def test_a_failed_export_leaves_nothing_and_nothing_is_overwritten(tiny_vlm_config, tmp_path,
                                                                   monkeypatch, capsys):
    ckpt = _bf16_trained_dir(tiny_vlm_config, tmp_path)
    out = tmp_path / "hf"

    def mismatch(result, *args):
        raise exporter.ExportMismatch("probe logits differ")
    monkeypatch.setattr(exporter, "check_llava_export", mismatch)
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 3
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["tok", "trained"]
    monkeypatch.undo()

    for target, message in ((ckpt, "overlaps the input"), (ckpt / "params", "overlaps the input")):
        assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(target)]) == 2
        assert message in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["notes.txt"]
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out),
                     "--overwrite"]) == 0
    assert "model.safetensors" in os.listdir(out) and "notes.txt" not in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["hf", "tok", "trained"]  # no staging left behind


@pytest.mark.parity
def test_the_self_check_compares_greedy_answers_through_the_chat_template(tiny_vlm_config, tmp_path,
                                                                          monkeypatch, capsys):
    import dataclasses

    from vlm_jax.data import templates
    ckpt = _bf16_trained_dir(tiny_vlm_config, tmp_path)
    saved = json.load(open(ckpt / "config.json"))
    saved["data"] = {"template": "minimal", "pad_to_square": True}  # as training records it
    (ckpt / "config.json").write_text(json.dumps(saved))
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "the same greedy answer (" in capsys.readouterr().out
    # a chat template that renders another prompt than ours is caught, and nothing is written
    minimal = templates.TEMPLATES["minimal"]
    monkeypatch.setitem(templates.TEMPLATES, "minimal", dataclasses.replace(
        minimal, jinja=minimal.jinja.replace("{{- bos ~ ", "{{- bos ~ 'w5 ' ~ ", 1)))
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf2")]) == 3
    assert "chat template gives prompt ids" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_a_prefix_lm_model_is_not_exported_as_a_causal_one(tiny_vlm_config, tmp_path, capsys):
    """Why / a model trained with data.prefix_lm=True (prompts attend both ways) exported as
    LLaVA or the custom format (both causal) would answer differently without a word: only
    PaliGemma expresses it, so another format is refused before any weight is read."""
    config = tiny_vlm_config(vocab_size=32)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    ckpt = tmp_path / "prefix_lm"
    model_dir.save_model(str(ckpt), config, params, None, data={"prefix_lm": True})
    capsys.readouterr()
    assert cli_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "prefix-LM" in err and "--format paligemma" in err
    assert not os.path.exists(tmp_path / "x")
