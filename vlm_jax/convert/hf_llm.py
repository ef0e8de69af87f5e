"""HF transformers <-> `models/decoder.py` for Llama / Qwen2 / Gemma: configs, weights, vocab growth.

Weights are flat `dict[str, np.ndarray]` state dicts with HF's key names; the caller reads and
writes safetensors. HF Linear weights are [out, in]; ours are [*in, *out] with heads split out:

    q_proj.weight  [H*hd, D]  <->  attention/q/kernel  [D, H, hd]     (= W.T reshaped)
    o_proj.weight  [D, H*hd]  <->  attention/o/kernel  [H, hd, D]     (= W.T reshaped)
    gate_proj.weight [F, D]   <->  mlp/gate/kernel     [D, F]
    lm_head.weight [V, D]     <->  lm_head/kernel      [D, V]

Only transposes and reshapes: export(import(sd)) reproduces every tensor bit-exactly.
Gemma's RMSNorm weight is stored as w and applied as (1 + w) on both sides, so it copies as is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import ConversionError
from vlm_jax.models.decoder import DecoderConfig, decoder_config

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# What HF hard-codes per family, that our config leaves switchable.
FAMILY_FIXED = {
    "llama": dict(qkv_bias=False, norm_plus_one=False, embed_scale=False),
    "qwen2": dict(qkv_bias=True, norm_plus_one=False, embed_scale=False),
    "gemma": dict(qkv_bias=False, norm_plus_one=True, embed_scale=True),
}
# HF class defaults for fields a config.json may leave out.
HF_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048),
    "qwen2": dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768),
    "gemma": dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  head_dim=256),
}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Old checkpoints saved the RoPE buffer; it is recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- configs

def _require(d: Mapping[str, Any], field: str) -> Any:
    if d.get(field) is None:
        raise ConversionError(f"HF config field {field!r} is missing")
    return d[field]


def _reject(field: str, value: Any, supported: str) -> None:
    raise ConversionError(f"HF config field {field}={value!r} is not supported (supported: {supported})")


def _rope_fields(d: Mapping[str, Any]) -> dict:
    """rope_theta + Llama-3 scaling from 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    field = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = dict(d.get(field) or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        _reject(field, params, "one flat dict shared by every layer")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        _reject("partial_rotary_factor", partial, "1.0")
    out = dict(rope_theta=float(theta))
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        _reject(f"{field}.rope_type", rope_type, "'default', 'llama3'")
    for key in LLAMA3_ROPE_KEYS:
        if params.get(key) is None:
            raise ConversionError(f"HF config field {field}.{key} is missing (needed by rope_type 'llama3')")
    return dict(out, rope_scaling_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _check_unimplemented(d: Mapping[str, Any], model_type: str) -> None:
    """Raise for HF options that would change the forward pass and that we do not implement."""
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(field) is not None:
            _reject(field, d[field], "None (no softcapping)")
    if d.get("attention_dropout", 0.0):
        _reject("attention_dropout", d["attention_dropout"], "0.0")
    if model_type in ("llama", "gemma") and d.get("attention_bias", False):
        _reject("attention_bias", d["attention_bias"], "False (q/k/v biases only via model_type qwen2)")
    if d.get("mlp_bias", False):
        _reject("mlp_bias", d["mlp_bias"], "False")
    if model_type == "gemma" and d.get("use_bidirectional_attention"):
        _reject("use_bidirectional_attention", d["use_bidirectional_attention"], "None/False")
    layer_types = d.get("layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        _reject("layer_types", sorted(set(layer_types)), "['full_attention'] only (no sliding window)")
    if model_type == "qwen2" and d.get("use_sliding_window") and not layer_types:
        window = d.get("sliding_window")
        num_layers = d.get("num_hidden_layers", 0)
        if (window is not None and window < d.get("max_position_embeddings", 32768)
                and d.get("max_window_layers", 28) < num_layers):
            _reject("use_sliding_window", True, "False (no sliding-window attention)")


def decoder_config_from_hf(d: Mapping[str, Any], **compute_fields) -> DecoderConfig:
    """DecoderConfig from an HF config.json dict (transformers 4.x or 5.x spelling).

    `compute_fields` (dtype, param_dtype, attention_backend, remat_policy) are ours, not HF's.
    """
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        _reject("model_type", model_type, str(SUPPORTED_MODEL_TYPES))
    _check_unimplemented(d, model_type)
    defaults = HF_DEFAULTS[model_type]
    hidden_size = int(_require(d, "hidden_size"))
    num_heads = int(_require(d, "num_attention_heads"))
    hidden_act = d.get("hidden_act") or defaults["hidden_act"]
    if model_type == "gemma" and hidden_act == "gelu":
        hidden_act = "gelu_pytorch_tanh"  # transformers rewrites Gemma's legacy value the same way
    if hidden_act not in HF_ACTIVATIONS:
        _reject("hidden_act", hidden_act, str(tuple(HF_ACTIVATIONS)))
    head_dim = d.get("head_dim") or defaults.get("head_dim") or hidden_size // num_heads
    return decoder_config(
        model_type,
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden_size,
        num_layers=int(_require(d, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        mlp_dim=int(_require(d, "intermediate_size")),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        mlp_act=HF_ACTIVATIONS[hidden_act],
        tie_embeddings=bool(d.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        max_position_embeddings=int(d.get("max_position_embeddings")
                                    or defaults["max_position_embeddings"]),
        **_rope_fields(d),
        **compute_fields,
    )


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    """A config.json dict that transformers loads into the matching *ForCausalLM."""
    for field, value in FAMILY_FIXED[cfg.family].items():
        if getattr(cfg, field) != value:
            raise ConversionError(f"DecoderConfig.{field}={getattr(cfg, field)!r} cannot be exported as HF "
                                  f"model_type {cfg.family!r}, which fixes {field}={value!r}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = dict(cfg.rope_scaling, rope_theta=cfg.rope_theta)
    out = {
        "model_type": cfg.family,
        "architectures": [ARCHITECTURES[cfg.family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp_act],
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "dtype": cfg.param_dtype,
    }
    if cfg.family in ("llama", "gemma"):
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family == "qwen2":
        out["use_sliding_window"] = False
    return out


# ----------------------------------------------------------------------------- weights

@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One per-layer tensor: HF key suffix, our path below `layers`, HF shape, our shape, kind."""
    hf_suffix: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    kind: str  # "linear" (W.T reshaped), "bias" (reshaped), "copy"


def _layer_tensors(cfg: DecoderConfig) -> list[_Tensor]:
    d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    out = [
        _Tensor("input_layernorm.weight", ("pre_attention_norm", "scale"), (d,), (d,), "copy"),
        _Tensor("self_attn.q_proj.weight", ("attention", "q", "kernel"), (h * hd, d), (d, h, hd), "linear"),
        _Tensor("self_attn.k_proj.weight", ("attention", "k", "kernel"), (k * hd, d), (d, k, hd), "linear"),
        _Tensor("self_attn.v_proj.weight", ("attention", "v", "kernel"), (k * hd, d), (d, k, hd), "linear"),
        _Tensor("self_attn.o_proj.weight", ("attention", "o", "kernel"), (d, h * hd), (h, hd, d), "linear"),
        _Tensor("post_attention_layernorm.weight", ("pre_mlp_norm", "scale"), (d,), (d,), "copy"),
        _Tensor("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), (f, d), (d, f), "linear"),
        _Tensor("mlp.up_proj.weight", ("mlp", "up", "kernel"), (f, d), (d, f), "linear"),
        _Tensor("mlp.down_proj.weight", ("mlp", "down", "kernel"), (d, f), (f, d), "linear"),
    ]
    if cfg.qkv_bias:
        out += [
            _Tensor("self_attn.q_proj.bias", ("attention", "q", "bias"), (h * hd,), (h, hd), "bias"),
            _Tensor("self_attn.k_proj.bias", ("attention", "k", "bias"), (k * hd,), (k, hd), "bias"),
            _Tensor("self_attn.v_proj.bias", ("attention", "v", "bias"), (k * hd,), (k, hd), "bias"),
        ]
    return out


def _to_ours(x: np.ndarray, t: _Tensor) -> np.ndarray:
    if t.kind == "linear":
        return x.T.reshape(t.shape)
    return x.reshape(t.shape)


def _to_hf(x: np.ndarray, t: _Tensor) -> np.ndarray:
    if t.kind == "linear":
        return np.ascontiguousarray(x.reshape(t.hf_shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(t.hf_shape))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def decoder_params_from_hf(sd: Mapping[str, np.ndarray], cfg: DecoderConfig, prefix: str = "model.",
                           lm_head_key: str = "lm_head.weight") -> dict:
    """Our param tree (plain nested dict of np arrays in cfg.param_dtype) from an HF state dict.

    Keys outside `prefix` (and other than `lm_head_key`) are left alone, so a whole LLaVA state
    dict can be passed. Missing/unexpected keys under `prefix` and shape mismatches raise.
    """
    param_dtype = jnp.dtype(cfg.param_dtype)
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise ConversionError(f"HF tensor {key!r} is missing from the state dict")
        value = np.asarray(sd[key])
        if value.shape != tuple(shape):
            raise ConversionError(f"HF tensor {key!r} has shape {value.shape}, expected {tuple(shape)}")
        used.add(key)
        return value.astype(param_dtype)

    v, d = cfg.vocab_size, cfg.hidden_size
    embedding = take(f"{prefix}embed_tokens.weight", (v, d))
    params: dict = {"embed": {"embedding": embedding},
                    "final_norm": {"scale": take(f"{prefix}norm.weight", (d,))}}
    for t in _layer_tensors(cfg):
        stacked = np.stack([_to_ours(take(f"{prefix}layers.{i}.{t.hf_suffix}", t.hf_shape), t)
                            for i in range(cfg.num_layers)])
        _set(params, ("layers",) + t.path, stacked)
    if cfg.tie_embeddings:
        if lm_head_key in sd:
            if not np.array_equal(take(lm_head_key, (v, d)), embedding):
                raise ConversionError(f"HF tensor {lm_head_key!r} differs from {prefix}embed_tokens.weight "
                                      "but the config ties embeddings (tie_embeddings=True)")
    else:
        params["lm_head"] = {"kernel": np.ascontiguousarray(take(lm_head_key, (v, d)).T)}
    unexpected = sorted(k for k in sd if k.startswith(prefix) and k not in used
                        and not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(f"unexpected HF tensor(s) under {prefix!r}: {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    return params


def decoder_params_to_hf(params: Mapping, cfg: DecoderConfig, prefix: str = "model.",
                         lm_head_key: str = "lm_head.weight") -> dict[str, np.ndarray]:
    """HF state dict from our params. A tied model has no `lm_head_key` entry (as HF saves it)."""
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
    sd = {f"{prefix}embed_tokens.weight": np.ascontiguousarray(params["embed"]["embedding"]),
          f"{prefix}norm.weight": np.ascontiguousarray(params["final_norm"]["scale"])}
    for t in _layer_tensors(cfg):
        stacked = _get(params["layers"], t.path)
        if stacked.shape != (cfg.num_layers,) + t.shape:
            raise ConversionError(f"param layers/{'/'.join(t.path)} has shape {stacked.shape}, "
                                  f"expected {(cfg.num_layers,) + t.shape}")
        for i in range(cfg.num_layers):
            sd[f"{prefix}layers.{i}.{t.hf_suffix}"] = _to_hf(stacked[i], t)
    if not cfg.tie_embeddings:
        sd[lm_head_key] = np.ascontiguousarray(params["lm_head"]["kernel"].T)
    return sd


# ----------------------------------------------------------------------------- vocabulary

def resize_vocab(params: Mapping, cfg: DecoderConfig, new_vocab_size: int,
                 rng: jax.Array | None = None) -> tuple[dict, DecoderConfig]:
    """Grow the embedding (and an untied lm_head) to `new_vocab_size` rows for added tokens.

    New rows start at the mean of the existing rows, so a new token (e.g. `<image>`) neither
    dominates nor vanishes from the softmax at the start of training. With `rng`, each new row
    gets noise of 1e-3 x the per-dimension std of the old rows so that several added tokens are
    not exact copies of each other. Existing rows are left bit-identical.
    """
    old = cfg.vocab_size
    if new_vocab_size < old:
        raise ConversionError(f"new_vocab_size={new_vocab_size} is smaller than vocab_size={old}; "
                              "resize_vocab only grows the vocabulary")
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
    num_new = new_vocab_size - old
    keys = iter(jax.random.split(rng, 2)) if rng is not None else None

    def grow_rows(table: np.ndarray) -> np.ndarray:  # table: [V, D]
        table32 = table.astype(np.float32)
        new_rows = np.broadcast_to(table32.mean(0), (num_new, table.shape[1])).copy()
        if keys is not None:
            noise = np.asarray(jax.random.normal(next(keys), new_rows.shape, jnp.float32))
            new_rows += noise * (1e-3 * table32.std(0))
        return np.concatenate([table, new_rows.astype(table.dtype)], axis=0)

    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy we may edit
    params["embed"] = {"embedding": grow_rows(params["embed"]["embedding"])}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": np.ascontiguousarray(grow_rows(params["lm_head"]["kernel"].T).T)}
    return params, dataclasses.replace(cfg, vocab_size=new_vocab_size)
