"""HF transformers <-> vlm_jax conversion for SigLIP: vision tower, text tower, contrastive scale/bias, configs.

State dicts are flat `dict[str, np.ndarray]` with HF's key names; the caller loads/saves the
safetensors. `prefix` selects the tower inside a bigger checkpoint:

    SiglipModel            vision_model.  text_model.  (and logit_scale / logit_bias at the root)
    SiglipVisionModel      ""             (transformers 5.x saves the bare tower)
    LlavaForConditionalGeneration (5.x)   model.vision_tower.

Importers read only keys under `prefix` and raise a ValueError naming the tensor for a missing key,
an unexpected key under the prefix, or a shape mismatch. Our params are the tower's own subtree
(what sits below 'vision_tower' / 'text_tower' in the VLM). Every mapping is a transpose/reshape,
so export(import(sd)) reproduces each f32 tensor bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_utils
from vlm_jax.errors import ConversionError
from vlm_jax.models.siglip import TextTowerConfig, VisionConfig, posemb_sincos_2d

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

SUPPORTED_ACT = "gelu_pytorch_tanh"
POSITION_TABLE = "embeddings.position_embedding.weight"  # the vision tower's, below its prefix


# ----------------------------------------------------------------------------- configs

def _check_common_hf_fields(d: Mapping[str, Any], expected_model_type: str, where: str) -> None:
    model_type = d.get("model_type", expected_model_type)
    if model_type != expected_model_type:
        raise ConversionError(f"{where}.model_type={model_type!r}; supported: {expected_model_type!r} "
                              "(for a SiglipModel config pass its vision_config / text_config)")
    if d.get("hidden_act", SUPPORTED_ACT) != SUPPORTED_ACT:
        raise ConversionError(f"{where}.hidden_act={d['hidden_act']!r}; supported: {SUPPORTED_ACT!r}")
    if float(d.get("attention_dropout", 0.0)) != 0.0:
        raise ConversionError(f"{where}.attention_dropout={d['attention_dropout']!r}; supported: 0.0")


def _square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"hf vision_config.{field}={value!r}; supported: an int or a square pair")
        return int(value[0])
    return int(value)


def vision_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> VisionConfig:
    """HF `SiglipVisionConfig` dict -> VisionConfig. Keys HF left at its defaults may be absent.

    `overrides` sets our own fields (feature_layer, posemb, dtype, param_dtype, attention_backend,
    remat_policy), e.g. `feature_layer=llava_config["vision_feature_layer"]`.
    """
    _check_common_hf_fields(d, "siglip_vision_model", "hf vision_config")
    if int(d.get("num_channels", 3)) != 3:
        raise ConversionError(f"hf vision_config.num_channels={d['num_channels']!r}; supported: 3")
    values = dict(
        image_size=_square(d.get("image_size", 224), "image_size"),
        patch_size=_square(d.get("patch_size", 16), "patch_size"),
        width=d.get("hidden_size", 768), depth=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12), mlp_dim=d.get("intermediate_size", 3072),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6), use_head=d.get("vision_use_head", True))
    return config_utils.from_dict(VisionConfig, {**values, **overrides}, "model.vision")


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """VisionConfig -> HF `SiglipVisionConfig` dict (feature_layer belongs to the LLaVA config)."""
    return dict(model_type="siglip_vision_model", hidden_size=cfg.width,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, num_channels=3, image_size=cfg.image_size,
                patch_size=cfg.patch_size, hidden_act=SUPPORTED_ACT,
                layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0,
                vision_use_head=cfg.use_head)


def text_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> TextTowerConfig:
    """HF `SiglipTextConfig` dict -> TextTowerConfig (token ids pad/bos/eos are tokenizer matters)."""
    _check_common_hf_fields(d, "siglip_text_model", "hf text_config")
    width = d.get("hidden_size", 768)
    projection = d.get("projection_size")
    values = dict(vocab_size=d.get("vocab_size", 32000), width=width,
                  depth=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
                  mlp_dim=d.get("intermediate_size", 3072),
                  max_len=d.get("max_position_embeddings", 64),
                  projection_dim=width if projection is None else projection,
                  layer_norm_eps=d.get("layer_norm_eps", 1e-6))
    return config_utils.from_dict(TextTowerConfig, {**values, **overrides}, "model.text_tower")


def text_config_to_hf(cfg: TextTowerConfig) -> dict[str, Any]:
    """TextTowerConfig -> HF `SiglipTextConfig` dict."""
    return dict(model_type="siglip_text_model", vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_len,
                hidden_act=SUPPORTED_ACT, layer_norm_eps=cfg.layer_norm_eps,
                attention_dropout=0.0, projection_size=cfg.projection_dim)


# ----------------------------------------------------------------------------- tensor mapping

class _Entry:
    """One HF tensor <-> one of our arrays: `to_ours` / `to_hf` are exact reshapes/transposes."""

    def __init__(self, hf_name: str, path: tuple[str, ...], hf_shape: tuple[int, ...],
                 to_ours: Callable[[np.ndarray], np.ndarray] = lambda w: w,
                 to_hf: Callable[[np.ndarray], np.ndarray] = lambda w: w):
        self.hf_name, self.path, self.hf_shape = hf_name, path, tuple(hf_shape)
        self.to_ours, self.to_hf = to_ours, to_hf


def _linear(hf: str, path: tuple[str, ...], in_shape: tuple[int, ...],
            out_shape: tuple[int, ...]) -> list[_Entry]:
    """torch Linear weight [out, in] + bias [out] <-> our Dense kernel [*in, *out] + bias [*out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return [
        _Entry(f"{hf}.weight", path + ("kernel",), (n_out, n_in),
               lambda w: w.T.reshape(*in_shape, *out_shape),
               lambda k: k.reshape(n_in, n_out).T),
        _Entry(f"{hf}.bias", path + ("bias",), (n_out,),
               lambda b: b.reshape(out_shape), lambda b: b.reshape(n_out)),
    ]


def _layernorm(hf: str, path: tuple[str, ...], width: int) -> list[_Entry]:
    return [_Entry(f"{hf}.weight", path + ("scale",), (width,)),
            _Entry(f"{hf}.bias", path + ("bias",), (width,))]


def _attention(hf: str, path: tuple[str, ...], width: int, num_heads: int) -> list[_Entry]:
    heads = (num_heads, width // num_heads)
    entries = []
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        entries += _linear(f"{hf}.{theirs}", path + (ours,), (width,), heads)
    return entries + _linear(f"{hf}.out_proj", path + ("o",), heads, (width,))


def _mlp(hf: str, path: tuple[str, ...], width: int, mlp_dim: int) -> list[_Entry]:
    return (_linear(f"{hf}.fc1", path + ("fc1",), (width,), (mlp_dim,))
            + _linear(f"{hf}.fc2", path + ("fc2",), (mlp_dim,), (width,)))


def _block_entries(cfg: VisionConfig | TextTowerConfig) -> list[_Entry]:
    """Per-layer entries; HF names relative to `encoder.layers.{i}.`, paths relative to `encoder`."""
    d = cfg.width
    return (_layernorm("layer_norm1", ("attention_norm",), d)
            + _attention("self_attn", ("attention",), d, cfg.num_heads)
            + _layernorm("layer_norm2", ("mlp_norm",), d)
            + _mlp("mlp", ("mlp",), d, cfg.mlp_dim))


def _vision_entries(cfg: VisionConfig) -> list[_Entry]:
    d, p = cfg.width, cfg.patch_size
    entries = [
        # Conv2d [D, C, kh, kw] <-> Dense over patches flattened as (kh, kw, C).
        _Entry("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), (d, 3, p, p),
               lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d),
               lambda k: k.reshape(p, p, 3, d).transpose(3, 2, 0, 1)),
        _Entry("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), (d,)),
    ]
    if cfg.posemb == "learn":
        entries.append(_Entry(POSITION_TABLE, ("pos_embedding",),
                              (cfg.num_patches, d)))
    entries += _layernorm("post_layernorm", ("post_layernorm",), d)
    if cfg.use_head:
        entries.append(_Entry("head.probe", ("head", "probe"), (1, 1, d)))
        # in_proj (q, k, v stacked) is handled separately: one HF tensor, three of ours.
        entries += _linear("head.attention.out_proj", ("head", "attention", "o"),
                           (cfg.num_heads, d // cfg.num_heads), (d,))
        entries += _layernorm("head.layernorm", ("head", "layernorm"), d)
        entries += _mlp("head.mlp", ("head", "mlp"), d, cfg.mlp_dim)
    return entries


def _text_entries(cfg: TextTowerConfig) -> list[_Entry]:
    d = cfg.width
    return ([_Entry("embeddings.token_embedding.weight", ("token_embedding",), (cfg.vocab_size, d)),
             _Entry("embeddings.position_embedding.weight", ("pos_embedding",), (cfg.max_len, d))]
            + _layernorm("final_layer_norm", ("final_norm",), d)
            + _linear("head", ("head",), (d,), (cfg.projection_dim,)))


class _Reader:
    """Takes tensors out of a state dict under `prefix`, checking names and shapes."""

    def __init__(self, sd: Mapping[str, np.ndarray], prefix: str):
        self.sd, self.prefix = sd, prefix
        self.unused = {k for k in sd if k.startswith(prefix)}

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.sd:
            raise ConversionError(f"missing tensor {key!r} in the HF state dict")
        value = np.asarray(self.sd[key])
        if tuple(value.shape) != tuple(shape):
            raise ConversionError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.unused.discard(key)
        return value.astype(np.float32)

    def finish(self) -> None:
        if self.unused:
            raise ConversionError(f"unexpected tensor(s) under prefix {self.prefix!r}: "
                                  f"{', '.join(sorted(self.unused))}")


def _set(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...], where: str) -> np.ndarray:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ConversionError(f"{where} params lack {'/'.join(path)}")
        node = node[key]
    return np.asarray(node, dtype=np.float32)


def _cast(tree: Params, param_dtype: str) -> Params:
    dtype = jnp.dtype(param_dtype)
    return {k: _cast(v, param_dtype) if isinstance(v, dict) else np.asarray(v, dtype)
            for k, v in tree.items()}


def _read_encoder(reader: _Reader, cfg, params: Params) -> None:
    for entry in _block_entries(cfg):
        per_layer = [entry.to_ours(reader.take(f"encoder.layers.{i}.{entry.hf_name}", entry.hf_shape))
                     for i in range(cfg.depth)]
        _set(params, ("encoder",) + entry.path, np.stack(per_layer))


def _write_encoder(params: Mapping[str, Any], cfg, prefix: str, sd: StateDict, where: str) -> None:
    for entry in _block_entries(cfg):
        stacked = _get(params, ("encoder",) + entry.path, where)
        if stacked.shape[0] != cfg.depth:
            raise ConversionError(f"{where} params encoder/{'/'.join(entry.path)} have {stacked.shape[0]} "
                                  f"layers, config says depth={cfg.depth}")
        for i in range(cfg.depth):
            sd[f"{prefix}encoder.layers.{i}.{entry.hf_name}"] = entry.to_hf(stacked[i])


# ----------------------------------------------------------------------------- vision

def vision_params_from_hf(sd: Mapping[str, np.ndarray], cfg: VisionConfig,
                          prefix: str = "vision_model.") -> Params:
    """HF SigLIP vision tensors under `prefix` -> our vision-tower params (cfg.param_dtype)."""
    reader = _Reader(sd, prefix)
    params: Params = {}
    for entry in _vision_entries(cfg):
        _set(params, entry.path, entry.to_ours(reader.take(entry.hf_name, entry.hf_shape)))
    if cfg.posemb == "sincos2d":
        # The fixed table is no parameter of ours: accept the checkpoint only if it holds that table.
        side = cfg.image_size // cfg.patch_size
        table = reader.take(POSITION_TABLE, (cfg.num_patches, cfg.width))
        if not np.allclose(table, posemb_sincos_2d(side, side, cfg.width), atol=1e-5):
            raise ConversionError(f"tensor {prefix}embeddings.position_embedding.weight is not the fixed "
                                  "sincos2d table; import with posemb='learn'")
    if cfg.use_head:
        d, heads = cfg.width, (cfg.num_heads, cfg.width // cfg.num_heads)
        weight = reader.take("head.attention.in_proj_weight", (3 * d, d))
        bias = reader.take("head.attention.in_proj_bias", (3 * d,))
        for i, name in enumerate(("q", "k", "v")):
            rows = slice(i * d, (i + 1) * d)
            _set(params, ("head", "attention", name, "kernel"), weight[rows].T.reshape(d, *heads))
            _set(params, ("head", "attention", name, "bias"), bias[rows].reshape(heads))
    _read_encoder(reader, cfg, params)
    reader.finish()
    return _cast(params, cfg.param_dtype)


def vision_params_to_hf(params: Mapping[str, Any], cfg: VisionConfig,
                        prefix: str = "vision_model.") -> StateDict:
    """Our vision-tower params -> HF tensors (f32) under `prefix`. A sincos2d tower exports its
    fixed table as HF's learned position embedding, which computes the same thing."""
    params = nn.unbox(params)
    sd: StateDict = {}
    for entry in _vision_entries(cfg):
        sd[prefix + entry.hf_name] = entry.to_hf(_get(params, entry.path, "vision"))
    if cfg.posemb == "sincos2d":
        side = cfg.image_size // cfg.patch_size
        sd[prefix + POSITION_TABLE] = posemb_sincos_2d(side, side, cfg.width)
    if cfg.use_head:
        d = cfg.width
        qkv = [params["head"]["attention"][name] for name in ("q", "k", "v")]
        sd[prefix + "head.attention.in_proj_weight"] = np.concatenate(
            [np.asarray(p["kernel"], np.float32).reshape(d, d).T for p in qkv])
        sd[prefix + "head.attention.in_proj_bias"] = np.concatenate(
            [np.asarray(p["bias"], np.float32).reshape(d) for p in qkv])
    _write_encoder(params, cfg, prefix, sd, "vision")
    return sd


# ----------------------------------------------------------------------------- text

def text_params_from_hf(sd: Mapping[str, np.ndarray], cfg: TextTowerConfig,
                        prefix: str = "text_model.") -> Params:
    """HF SigLIP text tensors under `prefix` -> our text-tower params (cfg.param_dtype)."""
    reader = _Reader(sd, prefix)
    params: Params = {}
    for entry in _text_entries(cfg):
        _set(params, entry.path, entry.to_ours(reader.take(entry.hf_name, entry.hf_shape)))
    _read_encoder(reader, cfg, params)
    reader.finish()
    return _cast(params, cfg.param_dtype)


def text_params_to_hf(params: Mapping[str, Any], cfg: TextTowerConfig,
                      prefix: str = "text_model.") -> StateDict:
    """Our text-tower params -> HF tensors (f32) under `prefix`."""
    params = nn.unbox(params)
    sd: StateDict = {prefix + e.hf_name: e.to_hf(_get(params, e.path, "text"))
                     for e in _text_entries(cfg)}
    _write_encoder(params, cfg, prefix, sd, "text")
    return sd


# ----------------------------------------------------------------------------- contrastive

def contrastive_params_from_hf(sd: Mapping[str, np.ndarray], prefix: str = "") -> Params:
    """SiglipModel's `logit_scale`, `logit_bias` (f32[1] each) -> {'logit_scale', 'logit_bias'}."""
    reader = _Reader(sd, prefix)
    return {name: reader.take(name, (1,)) for name in ("logit_scale", "logit_bias")}


def contrastive_params_to_hf(params: Mapping[str, Any], prefix: str = "") -> StateDict:
    params = nn.unbox(params)
    return {prefix + name: _get(params, (name,), "contrastive").reshape(1)
            for name in ("logit_scale", "logit_bias")}
