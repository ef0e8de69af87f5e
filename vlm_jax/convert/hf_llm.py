"""HF transformers <-> `models/decoder.py` for every decoder family: configs, weights, vocab growth.

What is particular to a family (its HF model_type, config fields, norm tensor names) lives in its
module in `models/families/`; this file applies it. Weights are flat `dict[str, np.ndarray]` state
dicts with HF's key names; the caller reads and writes safetensors. HF Linear weights are
[out, in]; ours are [*in, *out] with heads split out:

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

from vlm_jax.config import from_dict
from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.models import families
from vlm_jax.models.decoder import DecoderConfig
from vlm_jax.models.families import base

SUPPORTED_MODEL_TYPES = families.HF_MODEL_TYPES
# Old checkpoints saved the RoPE buffer; it is recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- configs

def decoder_config_from_hf(d: Mapping[str, Any], **compute_fields) -> DecoderConfig:
    """DecoderConfig from an HF text config.json dict (transformers 4.x or 5.x spelling), by the
    family its model_type names. Values we do not implement raise naming the HF field.

    `compute_fields` (dtype, param_dtype, attention_backend, remat_policy) are ours, not HF's.
    """
    family = families.for_hf_model_type(d.get("model_type"))
    family.check_hf(d)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(field) is not None and "attn_logit_softcap" not in family.free:
            base.reject(field, d[field], f"None for model_type {family.hf_model_type!r}")
    fields = base.shared_config_from_hf(d, family)
    fields.update(family.config_from_hf(d))
    try:
        return from_dict(DecoderConfig, {**fields, **compute_fields}, where="decoder")
    except ConfigError as e:
        raise ConversionError(f"HF {family.hf_model_type} config: {e}") from None


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    """A config.json dict that transformers loads into the family's *ForCausalLM."""
    family = families.get(cfg.family)
    return {**base.shared_config_to_hf(cfg, family), **family.config_to_hf(cfg)}


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
        _Tensor("self_attn.q_proj.weight", ("attention", "q", "kernel"), (h * hd, d), (d, h, hd), "linear"),
        _Tensor("self_attn.k_proj.weight", ("attention", "k", "kernel"), (k * hd, d), (d, k, hd), "linear"),
        _Tensor("self_attn.v_proj.weight", ("attention", "v", "kernel"), (k * hd, d), (d, k, hd), "linear"),
        _Tensor("self_attn.o_proj.weight", ("attention", "o", "kernel"), (d, h * hd), (h, hd, d), "linear"),
        _Tensor("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), (f, d), (d, f), "linear"),
        _Tensor("mlp.up_proj.weight", ("mlp", "up", "kernel"), (f, d), (d, f), "linear"),
        _Tensor("mlp.down_proj.weight", ("mlp", "down", "kernel"), (d, f), (f, d), "linear"),
    ]
    for ours, hf in families.get(cfg.family).norm_names.items():
        size = hd if ours.startswith("attention/") else d
        out.append(_Tensor(f"{hf}.weight", tuple(ours.split("/")) + ("scale",), (size,), (size,), "copy"))
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
