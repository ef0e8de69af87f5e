"""SigLIP towers and converters against transformers' PyTorch SigLIP (tiny random configs)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import hf_siglip
from vlm_jax.models import siglip

ATOL = 1e-4

HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=8, vision_use_head=True)
HF_TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=8, projection_size=32,
               pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """HF initialises biases, logit scale/bias and some norms to constants; random values make
    a swapped or dropped tensor visible in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _images(seed: int, height: int = 32, width: int = 32, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def hf_siglip_model():
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=HF_TEXT, vision_config=HF_VISION)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = transformers.SiglipModel(config).eval()
    _randomize_(model, 1)
    return model


@pytest.fixture(scope="module")
def state_dict(hf_siglip_model):
    return _state_dict(hf_siglip_model)


def _apply(module, variables, *args, method=None):
    """`module.apply` as one compiled program (run op by op it compiles every op: seconds)."""
    return jax.jit(lambda v, *a: module.apply(v, *a, method=method))(variables, *args)


def _vision(hf_model, sd, **overrides):
    cfg = hf_siglip.vision_config_from_hf(hf_model.config.vision_config.to_dict(), **overrides)
    return cfg, {"params": hf_siglip.vision_params_from_hf(sd, cfg, prefix="vision_model.")}


def _text(hf_model, sd):
    cfg = hf_siglip.text_config_from_hf(hf_model.config.text_config.to_dict())
    return cfg, {"params": hf_siglip.text_params_from_hf(sd, cfg, prefix="text_model.")}


@pytest.mark.parity
@pytest.mark.parametrize("feature_layer", [-1, -2, 0, 1])
def test_vision_features_match_hf_hidden_states(hf_siglip_model, state_dict, feature_layer):
    cfg, params = _vision(hf_siglip_model, state_dict, feature_layer=feature_layer)
    images = _images(feature_layer + 10)
    with torch.no_grad():
        want = hf_siglip_model.vision_model(_nchw(images), output_hidden_states=True)
    got = _apply(siglip.SiglipVisionTower(cfg), params, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(got), want.hidden_states[feature_layer].numpy(), atol=ATOL)


@pytest.mark.parity
def test_vision_pool_matches_hf_pooler_output(hf_siglip_model, state_dict):
    cfg, params = _vision(hf_siglip_model, state_dict)
    images = _images(3)
    with torch.no_grad():
        want = hf_siglip_model.vision_model(_nchw(images))
    tower = siglip.SiglipVisionTower(cfg)
    last, pooled = _apply(tower, params, jnp.asarray(images), method="encode")
    np.testing.assert_allclose(np.asarray(last), want.last_hidden_state.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=ATOL)
    pooled = _apply(tower, params, jnp.asarray(images), method="pool")
    np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=ATOL)


@pytest.mark.parity
@pytest.mark.parametrize("height,width", [(48, 24), (56, 56)])
def test_vision_other_image_size_matches_hf_interpolation(hf_siglip_model, state_dict, height, width):
    """48x24 upsamples the 4x4 table along y and downsamples along x; 56x56 is square upsampling."""
    cfg, params = _vision(hf_siglip_model, state_dict)
    images = _images(4, height, width)
    with torch.no_grad():
        want = hf_siglip_model.vision_model(_nchw(images), interpolate_pos_encoding=True,
                                            output_hidden_states=True)
    tower = siglip.SiglipVisionTower(cfg)
    features = _apply(tower, params, jnp.asarray(images))
    assert features.shape == (2, (height // 8) * (width // 8), 32)
    np.testing.assert_allclose(np.asarray(features), want.hidden_states[-1].numpy(), atol=ATOL)
    pooled = _apply(tower, params, jnp.asarray(images), method="pool")
    np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=ATOL)


@pytest.mark.parity
def test_text_tower_matches_hf(hf_siglip_model, state_dict):
    cfg, params = _text(hf_siglip_model, state_dict)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (3, cfg.max_len)).astype(np.int32)
    padding = np.ones_like(ids)
    padding[1, 5:] = 0
    tower = siglip.SiglipTextTower(cfg)
    for mask in (None, padding):
        with torch.no_grad():
            want = hf_siglip_model.text_model(
                torch.from_numpy(ids.astype(np.int64)),
                attention_mask=None if mask is None else torch.from_numpy(mask))
        hidden, pooled = _apply(tower, params, jnp.asarray(ids), mask, method="encode")
        np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=ATOL)
        np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=ATOL)
    # Shorter than max_len: positions are the first L rows of the table, as in HF.
    with torch.no_grad():
        want = hf_siglip_model.text_model(torch.from_numpy(ids[:, :5].astype(np.int64)))
    np.testing.assert_allclose(np.asarray(_apply(tower, params, jnp.asarray(ids[:, :5]))),
                               want.pooler_output.numpy(), atol=ATOL)


@pytest.mark.parity
def test_siglip_model_logits_match_hf(hf_siglip_model, state_dict):
    vision_cfg, vision_params = _vision(hf_siglip_model, state_dict)
    text_cfg, text_params = _text(hf_siglip_model, state_dict)
    contrastive = hf_siglip.contrastive_params_from_hf(state_dict)
    images = _images(6, batch=3)
    ids = np.random.default_rng(7).integers(0, text_cfg.vocab_size, (2, text_cfg.max_len))
    with torch.no_grad():
        want = hf_siglip_model(input_ids=torch.from_numpy(ids), pixel_values=_nchw(images))
    image_embeds = _apply(siglip.SiglipVisionTower(vision_cfg), vision_params,
                          jnp.asarray(images), method="pool")
    text_embeds = _apply(siglip.SiglipTextTower(text_cfg), text_params, jnp.asarray(ids, jnp.int32))
    logits = siglip.contrastive_logits(image_embeds, text_embeds, jnp.asarray(contrastive["logit_scale"]),
                                       jnp.asarray(contrastive["logit_bias"]))
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(logits), want.logits_per_image.numpy(), atol=ATOL)


@pytest.mark.parity
def test_round_trip_is_bit_exact(hf_siglip_model, state_dict):
    vision_cfg, vision_params = _vision(hf_siglip_model, state_dict)
    text_cfg, text_params = _text(hf_siglip_model, state_dict)
    exported = {
        **hf_siglip.vision_params_to_hf(vision_params["params"], vision_cfg, prefix="vision_model."),
        **hf_siglip.text_params_to_hf(text_params["params"], text_cfg, prefix="text_model."),
        **hf_siglip.contrastive_params_to_hf(hf_siglip.contrastive_params_from_hf(state_dict)),
    }
    assert sorted(exported) == sorted(state_dict)
    for key, value in state_dict.items():
        assert exported[key].dtype == np.float32 and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert hf_siglip.vision_config_from_hf(hf_siglip.vision_config_to_hf(vision_cfg)) == vision_cfg
    assert hf_siglip.text_config_from_hf(hf_siglip.text_config_to_hf(text_cfg)) == text_cfg
    # The exported config builds the same HF model.
    rebuilt = transformers.SiglipVisionConfig(**hf_siglip.vision_config_to_hf(vision_cfg))
    assert transformers.SiglipVisionModel(rebuilt).state_dict().keys() == {
        k.removeprefix("vision_model.") for k in exported if k.startswith("vision_model.")}


def test_init_params_match_import_layout(hf_siglip_model, state_dict):
    """Our own init creates exactly the tree the importer produces (post-LN and head included,
    even when feature_layer stops early), so export works on a freshly initialised tower."""
    cfg, imported = _vision(hf_siglip_model, state_dict, feature_layer=-2)
    initialised = nn.unbox(jax.eval_shape(siglip.SiglipVisionTower(cfg).init, jax.random.key(0),
                                          jnp.zeros((1, 32, 32, 3))))
    shapes = lambda tree: jax.tree.map(lambda a: np.shape(a), tree)
    assert shapes(initialised) == shapes(imported)
    text_cfg, text_imported = _text(hf_siglip_model, state_dict)
    text_init = nn.unbox(jax.eval_shape(siglip.SiglipTextTower(text_cfg).init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32)))
    assert shapes(text_init) == shapes(text_imported)


@pytest.mark.parity
def test_sincos2d_tower_exports_to_an_equivalent_hf_model():
    cfg = siglip.VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                              use_head=False, posemb="sincos2d")
    tower = siglip.SiglipVisionTower(cfg)
    images = _images(8)
    params = nn.unbox(jax.jit(tower.init)(jax.random.key(1), jnp.asarray(images)))
    assert "pos_embedding" not in params["params"]
    sd = hf_siglip.vision_params_to_hf(params["params"], cfg, prefix="")
    hf_config = transformers.SiglipVisionConfig(**hf_siglip.vision_config_to_hf(cfg))
    hf_model = transformers.SiglipVisionModel(hf_config).eval()
    hf_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    with torch.no_grad():
        want = hf_model(_nchw(images), output_hidden_states=True).hidden_states[-1].numpy()
    got = _apply(tower, params, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)
    # And back: the fixed table is accepted (and consumed) by the sincos2d importer.
    back = hf_siglip.vision_params_from_hf(sd, cfg, prefix="")
    assert jax.tree.map(np.shape, back) == jax.tree.map(np.shape, params["params"])


def test_converter_errors_name_the_tensor_or_field(hf_siglip_model, state_dict):
    cfg, params = _vision(hf_siglip_model, state_dict)
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    bad = dict(state_dict)
    bad[key] = np.zeros((65, 32), np.float32)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r".*\(65, 32\).*\(64, 32\)"):
        hf_siglip.vision_params_from_hf(bad, cfg)
    missing = {k: v for k, v in state_dict.items() if k != "vision_model.head.probe"}
    with pytest.raises(ValueError, match=r"missing tensor 'vision_model\.head\.probe'"):
        hf_siglip.vision_params_from_hf(missing, cfg)
    extra = dict(state_dict, **{"vision_model.encoder.layers.3.mlp.fc1.weight": np.zeros((64, 32))})
    with pytest.raises(ValueError, match=r"unexpected.*vision_model\.encoder\.layers\.3"):
        hf_siglip.vision_params_from_hf(extra, cfg)
    with pytest.raises(ValueError, match="hidden_act"):
        hf_siglip.vision_config_from_hf(dict(HF_VISION, hidden_act="gelu"))
    with pytest.raises(ValueError, match="model_type"):
        hf_siglip.text_config_from_hf(dict(HF_TEXT, model_type="clip_text_model"))
    with pytest.raises(ValueError, match="feature_layer"):
        siglip.VisionConfig(depth=3, feature_layer=-5)
    with pytest.raises(ValueError, match="posemb"):
        siglip.VisionConfig(posemb="sincos1d")
    no_head = siglip.SiglipVisionTower(dataclasses.replace(cfg, use_head=False))
    with pytest.raises(ValueError, match="use_head"):
        no_head.apply(params, jnp.zeros((1, 32, 32, 3)), method="pool")


def test_bicubic_resize_matches_torch_interpolate():
    table = np.random.default_rng(9).standard_normal((1, 1, 5, 5)).astype(np.float32)
    for out_h, out_w in ((9, 3), (2, 7), (5, 5)):
        want = torch.nn.functional.interpolate(torch.from_numpy(table), size=(out_h, out_w),
                                               mode="bicubic", align_corners=False).numpy()[0, 0]
        got = (siglip.bicubic_resize_matrix(5, out_h) @ table[0, 0]
               @ siglip.bicubic_resize_matrix(5, out_w).T)
        np.testing.assert_allclose(got, want, atol=1e-5)


def _lowered_program(depth: int) -> str:
    """The StableHLO that XLA compiles for the tower's forward at `depth` layers."""
    cfg = siglip.VisionConfig(image_size=16, patch_size=8, width=16, depth=depth, num_heads=2,
                              mlp_dim=32, feature_layer=-2)
    tower = siglip.SiglipVisionTower(cfg)
    images = jnp.zeros((1, 16, 16, 3))
    params = jax.eval_shape(tower.init, jax.random.key(0), images)
    return jax.jit(tower.apply).lower(params, images).as_text()


def test_compile_time_does_not_grow_with_depth():
    # Compile time follows program size: the layers are one scanned loop body, so 8 layers lower
    # to the very program of 2 (line for line; an unrolled stack would hold 4x the matmuls).
    # Measured on the program rather than with a clock, which a busy machine makes flaky.
    shallow, deep = _lowered_program(2), _lowered_program(8)
    assert "stablehlo.while" in deep
    assert deep.count("\n") == shallow.count("\n")
    assert deep.count("stablehlo.dot_general") == shallow.count("stablehlo.dot_general") > 0


@pytest.mark.parity
def test_siglip2_fixed_resolution_checkpoint_imports_and_matches(tmp_path):
    """Why / SigLIP 2's fixed-resolution checkpoints (google/siglip2-*-patch16-224 ... -512) are
    `model_type: siglip` in HF: the same towers with 64 text positions, a Gemma-sized vocabulary
    and tanh-GELU. One shaped like them (shrunk) imports with `import-hf --hf-dir` and gives HF's
    contrastive logits. (The variable-resolution NaFlex tower, model_type siglip2, is not
    supported: import-hf refuses that model_type.)"""
    from vlm_jax.cli import main as cli_main
    from vlm_jax.model_dir import load_model
    torch.manual_seed(3)
    text = dict(HF_TEXT, vocab_size=300, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh")
    vision = dict(HF_VISION, image_size=64, patch_size=16, hidden_act="gelu_pytorch_tanh")
    hf_model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text,
                                                                  vision_config=vision)).eval()
    _randomize_(hf_model, 4)
    hf_model.save_pretrained(tmp_path / "siglip2")
    assert cli_main(["import-hf", "--hf-dir", str(tmp_path / "siglip2"),
                     "--out", str(tmp_path / "ours")]) == 0
    config, params, _ = load_model(str(tmp_path / "ours"))
    assert config.text_tower.max_len == 64 and config.vision.patch_size == 16
    images = _images(8, height=64, width=64, batch=2)
    ids = np.random.default_rng(9).integers(0, 300, (3, 64))
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids), pixel_values=_nchw(images))
    params = jax.tree.map(np.asarray, params)
    image_embeds = _apply(siglip.SiglipVisionTower(config.vision),
                          {"params": params["vision_tower"]}, jnp.asarray(images), method="pool")
    text_embeds = _apply(siglip.SiglipTextTower(config.text_tower), {"params": params["text_tower"]},
                         jnp.asarray(ids, jnp.int32))
    logits = siglip.contrastive_logits(image_embeds, text_embeds,
                                       jnp.asarray(params["contrastive"]["logit_scale"]),
                                       jnp.asarray(params["contrastive"]["logit_bias"]))
    np.testing.assert_allclose(np.asarray(logits), want.logits_per_image.numpy(), atol=ATOL)
