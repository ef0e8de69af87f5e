"""Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`) in both directions: `import-hf` of an
Idefics3 directory computes transformers' logits, `export-hf --format idefics3` writes one that
transformers loads and that computes ours, HF -> import -> export -> HF is bit-exact, and what
Idefics3 cannot hold is refused naming the field (convert/hf_idefics3.py)."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

import vlm_jax
from vlm_jax import model_dir
from vlm_jax.cli import main as cli_main
from vlm_jax.convert import exporter, hf_idefics3
from vlm_jax.errors import ConversionError
from vlm_jax.models.projector import ProjectorConfig, pixel_shuffle
from vlm_jax.models.vlm import init_params

IMAGE_TOKEN_ID = 95  # the last id of hf_tiny's 96
TOKENS_PER_IMAGE = 4  # 32 px / 8 px patches = 16 patches, scale_factor 2 -> 4 tokens


def _hf_idefics3(hf_tiny, tie):
    """A tiny random Idefics3 with every tensor perturbed (norms off 1 / 0, biases non-zero), so
    no convention (post_layernorm, 1+w, a forgotten bias) can hide behind an init value."""
    torch.manual_seed(0)
    vision = hf_tiny.vision(layers=2).to_dict()
    vision.update(model_type="idefics3_vision")
    for key in ("vision_use_head",):
        vision.pop(key, None)
    config = Idefics3Config(vision_config=vision, text_config=hf_tiny.text("llama", tie).to_dict(),
                            scale_factor=2, image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_models(hf_tiny, tmp_path_factory):
    """{tie: (hf model, its saved directory, our imported model directory)}, built once."""
    out = {}
    for tie in (False, True):
        model = _hf_idefics3(hf_tiny, tie)
        root = tmp_path_factory.mktemp(f"idefics3_tie{int(tie)}")
        model.save_pretrained(root / "hf")
        assert cli_main(["import-hf", "--hf-dir", str(root / "hf"), "--out", str(root / "ours")]) == 0
        out[tie] = (model, str(root / "hf"), str(root / "ours"))
    return out


def _inputs(rng, images_per_row=(1, 2), text=10):
    """Two rows, images mid-text (the second row has two, the first is right-padded)."""
    rows = []
    for n in images_per_row:
        ids = list(rng.integers(0, IMAGE_TOKEN_ID, size=3))
        for _ in range(n):
            ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + list(rng.integers(0, IMAGE_TOKEN_ID, size=2))
        rows.append(ids)
    width = max(len(r) for r in rows) + text
    input_ids = np.zeros((len(rows), width), np.int64)
    attention_mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        r = r + list(rng.integers(0, IMAGE_TOKEN_ID, size=width - len(r) - (1 - b) * 3))
        input_ids[b, :len(r)] = r
        attention_mask[b, :len(r)] = 1
    pixels = rng.uniform(-1, 1, (sum(images_per_row), 3, 32, 32)).astype(np.float32)
    return input_ids, attention_mask, pixels, list(images_per_row)


def _hf_logits(model, input_ids, attention_mask, pixels, images_per_row):
    pixel_values, pixel_mask = hf_idefics3.pixel_values_for_hf(pixels, images_per_row)
    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                     pixel_values=torch.tensor(pixel_values),
                     pixel_attention_mask=torch.tensor(pixel_mask)).logits.numpy()


def test_pixel_shuffle_channel_order_is_idefics3s():
    """Why: the connector's Linear reads the shuffled channels in Idefics3's order; our
    pixel_shuffle must give the very same tensor (not merely the same shape), for s = 2 and 4."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    config = Idefics3Config(vision_config=dict(hidden_size=3, image_size=8, patch_size=1),
                            text_config=dict(model_type="llama", hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=8,
                                             vocab_size=10))
    connector = Idefics3Connector(config)
    x = np.random.default_rng(0).standard_normal((2, 64, 3)).astype(np.float32)
    for s in (2, 4):
        want = connector.pixel_shuffle(torch.tensor(x), s).numpy()
        np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, s)), want)


@pytest.mark.parity
@pytest.mark.parametrize("tie", [False, True])
def test_import_parity_with_transformers(hf_models, tie):
    """Why: an imported Idefics3 must compute what transformers computes (f32, eager): images
    mid-text, a row with two images (Idefics3's [B, num_images, 3, H, W] layout with a padding
    image), right padding; a tied and an untied head."""
    model, _, ours_dir = hf_models[tie]
    ours = vlm_jax.load(ours_dir)
    cfg = ours.config
    assert (cfg.projector.type, cfg.projector.mlp_depth, cfg.projector.bias,
            cfg.projector.input_norm, cfg.projector.pos_embed) == ("pixel_shuffle", 1, False, False,
                                                                  False)
    assert cfg.tokens_per_image == TOKENS_PER_IMAGE and cfg.llm.tie_embeddings == tie
    input_ids, attention_mask, pixels, per_row = _inputs(np.random.default_rng(1))
    want = _hf_logits(model, input_ids, attention_mask, pixels, per_row)
    got = ours.logits(input_ids, pixels, attention_mask)
    real = attention_mask.astype(bool)
    diff = float(np.abs(got[real] - want[real]).max())
    print(f"idefics3 import parity tie={tie}: max |diff| {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip_is_bit_exact_and_loads(hf_models, tmp_path, capsys, tie):
    """Why: `--format auto` must pick Idefics3 for an imported Idefics3 (exactly expressible),
    write the very tensors (names, dtypes, bits) transformers saved, pass its own logits
    self-check, and load back as Idefics3ForConditionalGeneration computing the original's logits."""
    model, hf_dir, ours_dir = hf_models[tie]
    out = tmp_path / "exported"
    assert cli_main(["export-hf", "--checkpoint", ours_dir, "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "Idefics3ForConditionalGeneration" in line, line
    print(line)
    want = load_file(os.path.join(hf_dir, "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert (config["scale_factor"], config["image_token_id"], config["tie_word_embeddings"]) == (
        2, IMAGE_TOKEN_ID, tie)
    exported, info = Idefics3ForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    input_ids, attention_mask, pixels, per_row = _inputs(np.random.default_rng(2))
    real = attention_mask.astype(bool)
    np.testing.assert_array_equal(
        _hf_logits(exported.eval(), input_ids, attention_mask, pixels, per_row)[real],
        _hf_logits(model, input_ids, attention_mask, pixels, per_row)[real])
    # and the export imports back to the very same params
    _, before, _ = model_dir.load_model(ours_dir)
    assert cli_main(["import-hf", "--hf-dir", str(out), "--out", str(tmp_path / "again")]) == 0
    _, after, _ = model_dir.load_model(str(tmp_path / "again"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 before, after)


def _composed(tiny_vlm_config, **projector):
    """Our tiny VLM composed the Idefics3 way (tower read after post_layernorm, pixel shuffle,
    one Linear without bias), with projector fields overridden."""
    options = dict(type="pixel_shuffle", mlp_depth=1, bias=False, pixel_shuffle_factor=2)
    return tiny_vlm_config(vocab_size=32, vision=dict(image_size=32, feature_post_norm=True),
                           projector=ProjectorConfig(**{**options, **projector}))


@pytest.mark.parity
def test_a_model_composed_the_idefics3_way_exports_as_idefics3(tiny_vlm_config, tmp_path):
    """Why: not only imports: a model of ours with Idefics3's composition (fresh weights) exports
    with `--format idefics3` and passes the logits self-check against transformers."""
    config = _composed(tiny_vlm_config)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    assert exporter.resolve_format(config, "auto") == "idefics3"
    result = exporter.export_params(config, params, None, str(tmp_path / "hf"), format="idefics3")
    print(f"idefics3 export self-check: max |diff| {result.max_abs_diff:.3g}")
    assert result.format == "idefics3" and result.max_abs_diff <= exporter.F32_TOLERANCE


@pytest.mark.parametrize("change,field", [
    (dict(projector=dict(mlp_depth=2)), "model.projector.mlp_depth=2"),
    (dict(projector=dict(bias=True)), "model.projector.bias=True"),
    (dict(projector=dict(input_norm=True)), "model.projector.input_norm=True"),
    (dict(projector=dict(pos_embed=True)), "model.projector.pos_embed=True"),
    (dict(projector=dict(type="mlp2x_gelu")), "model.projector.type='mlp2x_gelu'"),
    (dict(vision=dict(feature_post_norm=False)), "model.vision.feature_post_norm=False"),
    (dict(vision=dict(feature_layer=-2, depth=2)), "model.vision.feature_layer=-2"),
    (dict(family="qwen2"), "model.llm.family='qwen2'"),
    (dict(vision=dict(image_size=19 * 8)), "model.vision.image_size=152"),
])
def test_what_idefics3_cannot_hold_is_refused_naming_the_field(tiny_vlm_config, tmp_path, change,
                                                                field):
    """Why: `--format idefics3` must refuse, from the config alone and before writing anything,
    a model Idefics3 would compute differently, naming the field; `auto` then picks another
    format. (A 19-patch grid: Idefics3's float32 position bucketing skips a table row there.)"""
    projector = {**dict(type="pixel_shuffle", mlp_depth=1, bias=False, pixel_shuffle_factor=2),
                 **change.get("projector", {})}
    vision = {**dict(image_size=32, feature_post_norm=True), **change.get("vision", {})}
    if vision["image_size"] == 152:
        projector["pixel_shuffle_factor"] = 1
    config = tiny_vlm_config(vocab_size=32, family=change.get("family", "llama"), vision=vision,
                             projector=ProjectorConfig(**projector))
    with pytest.raises(ConversionError, match=field.replace("(", r"\(").replace(")", r"\)")):
        exporter.export_params(config, {}, None, str(tmp_path / "x"), format="idefics3")
    assert not (tmp_path / "x").exists()
    assert exporter.resolve_format(config, "auto") != "idefics3"


def test_import_refuses_what_it_cannot_express(hf_models, tmp_path, capsys):
    """Why: an Idefics3 directory we cannot compute exactly must be refused naming its field,
    not imported into a model that answers differently."""
    _, hf_dir, _ = hf_models[False]
    base = json.load(open(os.path.join(hf_dir, "config.json")))
    cases = [
        (dict(text_config=dict(base["text_config"], model_type="qwen2")), "text_config.model_type"),
        (dict(vision_config=dict(base["vision_config"], image_size=19 * 8, patch_size=8),
              scale_factor=1), "vision_config.image_size=152"),
        (dict(vision_config=dict(base["vision_config"], hidden_act="gelu")), "hidden_act"),
        (dict(scale_factor=3), "scale_factor=3"),
    ]
    for i, (change, field) in enumerate(cases):
        with pytest.raises(ConversionError, match=field):
            hf_idefics3.config_from_hf({**base, **change})
    # a tensor of the wrong shape, through the CLI
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    sd[hf_idefics3.PROJ_KEY] = sd[hf_idefics3.PROJ_KEY][:, :-1].copy()
    from safetensors.numpy import save_file
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(base))
    assert cli_main(["import-hf", "--hf-dir", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert hf_idefics3.PROJ_KEY in capsys.readouterr().err


WRAP_TOKENS = ["<fake_token_around_image>", "<global-img>", "<image>"]  # ids 93, 94, 95


def _save_smolvlm_tokenizer(directory):
    """A word-level tokenizer with SmolVLM's image tokens as special tokens, `<image>` at
    IMAGE_TOKEN_ID, and chatml's turn markers."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers
    names = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    names += [f"w{i}" for i in range(IMAGE_TOKEN_ID + 1 - len(WRAP_TOKENS) - len(names))]
    vocab = {w: i for i, w in enumerate(names + WRAP_TOKENS)}
    assert vocab["<image>"] == IMAGE_TOKEN_ID
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in names[:5] + WRAP_TOKENS])
    tok.save(os.path.join(directory, "tokenizer.json"))


@pytest.mark.parity
def test_a_smolvlm_import_writes_images_as_its_processor_and_exports_with_it(hf_models, tmp_path,
                                                                              capsys):
    """Why: SmolVLM's processor writes each single-tile image as <fake_token_around_image>
    <global-img> + image tokens + <fake_token_around_image>; an import with its tokenizer must
    record that layout, so that training and `vlm-jax generate` read images as the checkpoint
    learned them, and the export must carry an Idefics3Processor that writes exactly our ids and
    pixels, with transformers' greedy answer through it equal to ours."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP
    from vlm_jax.inference.prompts import prompt_ids

    model, _, _ = hf_models[False]
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    _save_smolvlm_tokenizer(hf_dir)
    ours = tmp_path / "ours"
    assert cli_main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(ours)]) == 0
    loaded = vlm_jax.load(str(ours))
    assert loaded.tokenizer.image_wrap == IDEFICS3_IMAGE_WRAP
    fake, glob, image = (loaded.tokenizer.token_to_id(t) for t in WRAP_TOKENS)
    ids = prompt_ids(loaded.tokenizer, "w1 w2", "chatml", TOKENS_PER_IMAGE).tolist()
    at = ids.index(image)
    assert ids[at - 2:at + TOKENS_PER_IMAGE + 1] == [fake, glob] + [image] * TOKENS_PER_IMAGE + [
        fake]

    # As a model trained with chatml would be saved (the import records no template).
    config, params, tokenizer = model_dir.load_model(str(ours))
    trained = tmp_path / "trained"
    model_dir.save_model(str(trained), config, params, tokenizer, data={"template": "chatml"})
    out = tmp_path / "exported"
    assert cli_main(["export-hf", "--checkpoint", str(trained), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    print(line)
    assert "Idefics3ForConditionalGeneration" in line and "the same greedy answer" in line, line
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Idefics3Processor"
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    batch = processor(images=picture, text="w1 <image> w2", return_tensors="np")
    assert batch["input_ids"][0].tolist() == tokenizer.expand_images(
        tokenizer.encode("w1 <image> w2"), TOKENS_PER_IMAGE)[0].tolist()
    assert batch["pixel_values"].shape == (1, 1, 3, 32, 32)


def test_the_image_layout_decides_which_processor_an_export_gets():
    """Why: a processor writing another image layout than the model learned would feed it
    inputs it never saw: an Idefics3-wrapped tokenizer gets no LLaVA / custom processor, a bare
    one no Idefics3Processor, and Idefics3's (no tiling) cannot pad to a square."""
    from vlm_jax.convert.hf_processor import ChatSettings, processor_blocker
    from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP, train_word_tokenizer
    tok = train_word_tokenizer(["a b c"], special_tokens=WRAP_TOKENS[:2])
    chat = ChatSettings("chatml")
    assert processor_blocker("idefics3", chat, tok) is not None
    assert processor_blocker("llava", chat, tok) is None
    tok.image_wrap = IDEFICS3_IMAGE_WRAP
    assert processor_blocker("idefics3", chat, tok) is None
    for fmt in ("llava", "custom", "paligemma"):
        assert "<global-img>" in processor_blocker(fmt, chat, tok), fmt
    assert "data.pad_to_square=True" in processor_blocker(
        "idefics3", ChatSettings("chatml", pad_to_square=True), tok)
