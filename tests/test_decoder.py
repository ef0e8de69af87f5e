"""Decoder LLM vs transformers' Llama / Qwen2 / Gemma, HF converters, vocab growth, compile time."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.config import from_dict  # noqa: E402
from vlm_jax.convert import hf_llm  # noqa: E402
from vlm_jax.models import families, layers  # noqa: E402
from vlm_jax.models.vlm import VLMConfig  # noqa: E402
from vlm_jax.models.decoder import Decoder, DecoderConfig, decoder_config  # noqa: E402

HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_model(model_type: str, seed: int = 0, **overrides):
    """A tiny HF *ForCausalLM (f32, eval, eager attention) with every weight randomised: HF's
    init leaves norms at 1 (or 0 for Gemma) and biases at 0, which would hide layout bugs."""
    config_cls, model_cls = HF_CLASSES[model_type]
    config = config_cls(**{**TINY, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name and model_type != "gemma") else 0.0
            p.copy_(base + 0.3 * torch.randn_like(p))
    return model


def _state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _mask_and_positions(padding: str, batch: int, length: int):
    """HF's 2-D attention mask (1 = token) and the positions HF would use for it."""
    mask = np.ones((batch, length), np.int64)
    if padding == "left":
        mask[0, :3] = 0
    elif padding == "right":
        mask[0, -3:] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return mask, positions


def _our_logits(cfg: DecoderConfig, params, input_ids, pad_mask, positions):
    mask = layers.make_attention_mask(jnp.ones_like(input_ids), segment_ids=jnp.asarray(pad_mask))

    def forward(model, ids, pos, mask):
        return model(model.embed(ids), pos, mask)

    fn = jax.jit(nn.apply(forward, Decoder(cfg)))
    return np.asarray(fn({"params": params}, jnp.asarray(input_ids), jnp.asarray(positions), mask))


PARITY_CASES = {
    # name: (model_type, HF overrides, padding, custom positions)
    "llama_mha_untied_left_pad": ("llama", dict(num_key_value_heads=4), "left", False),
    "llama_gqa_tied_llama3_rope_right_pad": (
        "llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
        "right", False),
    "llama_mqa_custom_positions": ("llama", dict(num_key_value_heads=1), "none", True),
    "qwen2_gqa_bias_left_pad": ("qwen2", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}), "left", False),
    "gemma_head_dim_geglu_right_pad": ("gemma", dict(num_key_value_heads=2, head_dim=16), "right", True),
    # Why / a family is one file: mistral.py + its name in families.NAMES (nothing else) gives a
    # decoder whose every layer slides (window 4 < the 9 tokens here, so the window cuts).
    "mistral_sliding_window_every_layer": ("mistral", dict(num_key_value_heads=2, head_dim=16,
                                                           sliding_window=4), "right", False),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(case):
    model_type, overrides, padding, custom_positions = PARITY_CASES[case]
    model = _hf_model(model_type, **overrides)
    cfg = hf_llm.decoder_config_from_hf(model.config.to_dict())
    params = hf_llm.decoder_params_from_hf(_state_dict(model), cfg)
    rng = np.random.default_rng(1)
    batch, length = 2, 9
    input_ids = rng.integers(0, cfg.vocab_size, (batch, length))
    pad_mask, positions = _mask_and_positions(padding, batch, length)
    if custom_positions:  # e.g. a continuation of a longer context, and a strided row
        positions = np.stack([np.arange(length) + 5, 2 * np.arange(length)]) * pad_mask
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(pad_mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    ours = _our_logits(cfg, params, input_ids, pad_mask, positions)
    assert ours.dtype == np.float32
    valid = pad_mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    print(f"\n{case}: max |diff| {err:.2e}")
    assert err <= 1e-4, f"{case}: max |diff| {err:.2e} (logit scale {np.abs(ref).max():.1f})"


@pytest.mark.parity
def test_gemma_call_takes_inputs_embeds_unscaled_like_hf():
    """HF 5.x scales Gemma's token embeddings inside embed_tokens, so spliced inputs_embeds (image
    features) are not scaled: our __call__ must match HF's inputs_embeds path as is."""
    model = _hf_model("gemma", num_key_value_heads=1, head_dim=16)
    cfg = hf_llm.decoder_config_from_hf(model.config.to_dict())
    params = hf_llm.decoder_params_from_hf(_state_dict(model), cfg)
    embeds = np.random.default_rng(2).standard_normal((2, 6, cfg.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(6), (2, 6))
    with torch.no_grad():
        ref = model(inputs_embeds=torch.tensor(embeds), position_ids=torch.tensor(positions)).logits.numpy()
    mask = layers.make_attention_mask(jnp.ones((2, 6), jnp.int32))
    ours = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(embeds), jnp.asarray(positions), mask)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        hf_embeds = model.get_input_embeddings()(torch.tensor([[3, 7]])).numpy()
    ours_embeds = Decoder(cfg).apply({"params": params}, jnp.array([[3, 7]]), method="embed")
    np.testing.assert_allclose(np.asarray(ours_embeds), hf_embeds, rtol=1e-6)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=2)),
    ("gemma", dict(num_key_value_heads=1, head_dim=16)),
])
@pytest.mark.parity
def test_round_trip_bit_exact_and_export_loads_in_transformers(model_type, overrides):
    model = _hf_model(model_type, **overrides)
    sd = _state_dict(model)
    cfg = hf_llm.decoder_config_from_hf(model.config.to_dict())
    exported = hf_llm.decoder_params_to_hf(hf_llm.decoder_params_from_hf(sd, cfg), cfg)
    expected = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key

    hf_dict = hf_llm.decoder_config_to_hf(cfg)
    assert hf_llm.decoder_config_from_hf(hf_dict) == cfg
    hf_config = transformers.AutoConfig.for_model(**hf_dict, attn_implementation="eager")
    reloaded = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    assert type(reloaded).__name__ == hf_dict["architectures"][0]
    missing, unexpected = reloaded.load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    ids = torch.tensor(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 7)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(input_ids=ids).logits.numpy(),
                                      model(input_ids=ids).logits.numpy())


def test_config_from_hf_accepts_4x_rope_spelling():
    d5 = {**TINY, "model_type": "llama", "num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}
    d4 = {**TINY, "model_type": "llama", "num_key_value_heads": 2, "rope_theta": 10000.0,
          "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                 if k not in ("rope_type", "rope_theta")}}}
    cfg = hf_llm.decoder_config_from_hf(d5)
    assert cfg == hf_llm.decoder_config_from_hf(d4)
    assert cfg.rope_scaling_factor == 8.0 and cfg.rope_original_max_position_embeddings == 16


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "mixtral", "model_type"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
    ("hidden_act", "relu", "hidden_act"),
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ("attention_bias", True, "attention_bias"),
    ("num_local_experts", 8, "num_local_experts.*mixture of experts"),
])
def test_config_from_hf_rejects_unsupported(field, value, match):
    d = {**TINY, "model_type": "llama", field: value}
    with pytest.raises(ValueError, match=match):
        hf_llm.decoder_config_from_hf(d)


def test_params_from_hf_errors_name_the_tensor():
    model = _hf_model("qwen2", num_key_value_heads=2)
    cfg = hf_llm.decoder_config_from_hf(model.config.to_dict())
    sd = _state_dict(model)
    bad_key = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=rf"{bad_key}.*shape \(32, 32\), expected \(16, 32\)"):
        hf_llm.decoder_params_from_hf({**sd, bad_key: np.zeros((32, 32), np.float32)}, cfg)
    missing = "model.layers.0.self_attn.v_proj.bias"
    with pytest.raises(ValueError, match=f"{missing}.*missing"):
        hf_llm.decoder_params_from_hf({k: v for k, v in sd.items() if k != missing}, cfg)
    extra = "model.layers.0.self_attn.q_norm.weight"
    with pytest.raises(ValueError, match=f"unexpected.*{extra}"):
        hf_llm.decoder_params_from_hf({**sd, extra: np.ones(8, np.float32)}, cfg)
    # keys outside the prefix (another tower of a LLaVA checkpoint) are not ours to judge
    llava = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in sd.items()}
    llava["model.vision_tower.embeddings.patch_embedding.weight"] = np.ones((2, 2), np.float32)
    params = hf_llm.decoder_params_from_hf(llava, cfg, prefix="model.language_model.")
    assert params["layers"]["attention"]["q"]["bias"].shape == (2, 4, 8)


def test_family_defaults_and_config_validation():
    gemma = decoder_config("gemma", hidden_size=64)
    assert (gemma.mlp_act, gemma.norm_plus_one, gemma.embed_scale, gemma.tie_embeddings) == (
        "gelu_tanh", True, True, True)
    assert decoder_config("qwen2").qkv_bias and not decoder_config("llama").qkv_bias
    assert hash(gemma) == hash(decoder_config("gemma", hidden_size=64))
    with pytest.raises(ValueError, match="family"):
        decoder_config("mixtral")
    with pytest.raises(ValueError, match="num_kv_heads"):
        decoder_config("llama", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown config key.*decoder.rope_scaling"):
        decoder_config("llama", rope_scaling={"factor": 8})
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_llm.decoder_config_to_hf(dataclasses.replace(decoder_config("llama"), qkv_bias=True))


def test_a_family_named_in_a_config_section_is_that_family():
    """Why / `model.llm = dict(family="gemma", ...)` went through from_dict and built a Llama
    labelled gemma (no 1+w norms, no sqrt(d) scale, SwiGLU, untied): every path that builds a
    DecoderConfig now takes the family's structural values, and a contradiction is an error
    naming the field and the family."""
    section = dict(family="gemma", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=1, head_dim=8, mlp_dim=48)
    llm = from_dict(VLMConfig, {"llm": section}, where="model").llm
    assert (llm.norm_plus_one, llm.embed_scale, llm.mlp_act, llm.tie_embeddings) == (
        True, True, "gelu_tanh", True)
    assert llm == decoder_config("gemma", **{k: v for k, v in section.items() if k != "family"})
    with pytest.raises(ValueError, match=r"norm_plus_one=False contradicts family='gemma'"):
        from_dict(VLMConfig, {"llm": dict(section, norm_plus_one=False)}, where="model")
    with pytest.raises(ValueError, match=r"qk_norm=False contradicts family='qwen3'"):
        decoder_config("qwen3", qk_norm=False)
    # A field the family leaves free may differ: an untied Gemma, a tied Llama.
    assert not decoder_config("gemma", tie_embeddings=False).tie_embeddings
    # A saved config (every field written out) reloads to the same config.
    gemma2 = decoder_config("gemma2", num_layers=4)
    assert from_dict(DecoderConfig, dataclasses.asdict(gemma2)) == gemma2
    assert gemma2.layer_types == ("sliding_attention", "full_attention") * 2


def test_every_family_is_one_complete_module():
    """Each registered family gives every structural value, a chat template we have, and HF
    names that map back to it; nope_layers / sliding layers only where the family has them."""
    from vlm_jax.data.templates import TEMPLATES
    from vlm_jax.models.families.base import STRUCTURAL
    for name in families.NAMES:
        family = families.get(name)
        assert set(STRUCTURAL) <= set(family.defaults) and family.template in TEMPLATES
        assert families.for_hf_model_type(family.hf_model_type) is family
        cfg = decoder_config(name, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                             head_dim=8, mlp_dim=48, vocab_size=64)
        assert hf_llm.decoder_config_from_hf(hf_llm.decoder_config_to_hf(cfg)) == cfg, name
    with pytest.raises(ValueError, match="nope_layers"):
        decoder_config("llama", nope_layers=(1,))
    with pytest.raises(ValueError, match="layer_types"):
        decoder_config("llama", layer_types=("sliding_attention",) * 8)
    with pytest.raises(ValueError, match="attention_backend"):
        decoder_config("gemma2", attention_backend="tpu_flash")


def _tiny_cfg(**overrides) -> DecoderConfig:
    return decoder_config("llama", **{**dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                                             num_kv_heads=2, head_dim=8, mlp_dim=48), **overrides})


def _init(cfg: DecoderConfig, length: int = 5):
    mask = layers.make_attention_mask(jnp.ones((1, length), jnp.int32))
    return Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, length, cfg.hidden_size)),
                             jnp.zeros((1, length), jnp.int32), mask)


def _random_params(cfg: DecoderConfig, seed: int = 0) -> dict:
    """Random f32 params of the right shapes, without paying for a compiled init."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_init(cfg))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_param_paths_and_logical_axes():
    variables = jax.eval_shape(lambda: _init(_tiny_cfg()))
    specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(variables)["params"],
                                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs["embed"]["embedding"] == ("vocab", "embed")
    assert specs["layers"]["attention"]["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert specs["layers"]["attention"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert specs["layers"]["attention"]["o"]["kernel"] == ("layers", "heads", "head_dim", "embed")
    assert specs["layers"]["mlp"]["down"]["kernel"] == ("layers", "mlp", "embed")
    assert specs["lm_head"]["kernel"] == ("embed", "vocab")
    assert "lm_head" not in jax.eval_shape(lambda: _init(_tiny_cfg(tie_embeddings=True)))["params"]


def test_bf16_compute_gives_f32_logits_close_to_f32():
    cfg = _tiny_cfg()
    params = _random_params(cfg)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 6))
    pad, pos = _mask_and_positions("none", 2, 6)
    ref = _our_logits(cfg, params, ids, pad, pos)
    low = _our_logits(dataclasses.replace(cfg, dtype="bfloat16", remat_policy="full"), params, ids, pad, pos)
    assert low.dtype == np.float32
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max()


def test_resize_vocab_keeps_old_logits_and_starts_new_rows_at_mean():
    cfg = _tiny_cfg(tie_embeddings=True)
    params = _random_params(cfg)
    grown, new_cfg = hf_llm.resize_vocab(params, cfg, cfg.vocab_size + 3)
    assert new_cfg.vocab_size == cfg.vocab_size + 3
    table = np.asarray(params["embed"]["embedding"])
    np.testing.assert_array_equal(grown["embed"]["embedding"][:cfg.vocab_size], table)
    np.testing.assert_allclose(grown["embed"]["embedding"][-3:], np.tile(table.mean(0), (3, 1)), rtol=1e-6)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 6))
    pad, pos = _mask_and_positions("none", 1, 6)
    before = _our_logits(cfg, params, ids, pad, pos)
    after = _our_logits(new_cfg, grown, ids, pad, pos)
    # Same numbers up to float rounding: XLA may tile the logit matmul differently for a wider
    # vocab (CI's Intel CPU did, 2e-7 apart), so bit equality is not a property of the resize.
    np.testing.assert_allclose(after[..., :cfg.vocab_size], before, rtol=1e-6, atol=1e-6)

    noisy, _ = hf_llm.resize_vocab(params, cfg, cfg.vocab_size + 2, rng=jax.random.key(1))
    new_rows = noisy["embed"]["embedding"][-2:]
    assert not np.array_equal(new_rows[0], new_rows[1])
    np.testing.assert_allclose(new_rows, np.tile(table.mean(0), (2, 1)), atol=1e-2 * table.std())
    with pytest.raises(ValueError, match="new_vocab_size"):
        hf_llm.resize_vocab(params, cfg, cfg.vocab_size - 1)


def test_resize_vocab_grows_untied_lm_head_columns_at_mean():
    cfg = _tiny_cfg()
    params = _random_params(cfg)
    grown, _ = hf_llm.resize_vocab(params, cfg, cfg.vocab_size + 2)
    kernel = np.asarray(params["lm_head"]["kernel"])  # [D, V]
    assert grown["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size + 2)
    np.testing.assert_array_equal(grown["lm_head"]["kernel"][:, :cfg.vocab_size], kernel)
    np.testing.assert_allclose(grown["lm_head"]["kernel"][:, -2:], np.tile(kernel.mean(1)[:, None], 2),
                               rtol=1e-6)


def _lowered_program(num_layers: int) -> str:
    """The StableHLO that XLA compiles for jit(apply) at `num_layers` (full remat)."""
    cfg = _tiny_cfg(num_layers=num_layers, remat_policy="full")
    params = jax.eval_shape(lambda: nn.meta.unbox(_init(cfg))["params"])
    embeds = jax.ShapeDtypeStruct((2, 8, cfg.hidden_size), jnp.float32)
    positions = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, 1, 8, 8), jnp.bool_)
    return jax.jit(Decoder(cfg).apply).lower({"params": params}, embeds, positions, mask).as_text()


def test_compile_time_does_not_grow_with_depth():
    # Compile time follows program size: scan keeps one loop body, so 16 layers lower to the very
    # program of 4 (line for line; an unrolled stack would hold 4x the matmuls). Measured on the
    # program rather than with a clock, which a busy machine makes flaky.
    shallow, deep = _lowered_program(4), _lowered_program(16)
    assert "stablehlo.while" in deep
    assert deep.count("\n") == shallow.count("\n")
    assert deep.count("stablehlo.dot_general") == shallow.count("stablehlo.dot_general") > 0
