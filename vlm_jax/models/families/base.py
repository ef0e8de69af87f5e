"""What a decoder family is: the `Family` record each module in this package fills in, and the HF
config fields every family shares.

A family module (llama.py, gemma2.py, ...) declares, in one place:
  * `defaults`: the value of every structural `DecoderConfig` field (STRUCTURAL) for this family;
    `free`: the fields a config may set otherwise (e.g. tie_embeddings). A field outside `free`
    that a config contradicts is an error naming the field and the family;
  * `layer_types(num_layers)`: its default per-layer attention pattern (full / sliding window);
    `nope_layers(num_layers)`: the layers without RoPE, for a family that has such layers;
  * `template`: the chat template it is trained and decoded with (data/templates.py);
  * the HF side: `hf_model_type`, `hf_architecture`, `hf_defaults` (HF class defaults for fields a
    config.json may leave out), `norm_names` (our per-layer norm path -> HF tensor suffix),
    `config_from_hf` / `config_to_hf` (the family's own HF fields, beyond the SHARED ones read by
    `shared_config_from_hf`), `check_hf` (HF values it refuses, naming the field);
  * `llava_applies_final_softcap`: whether transformers' LLaVA over this text model applies the
    final-logit soft-cap (it does not for any family: the cap lives in *ForCausalLM).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from vlm_jax.errors import ConversionError

# The DecoderConfig fields a family decides (None in a config = the family's value).
STRUCTURAL = ("qkv_bias", "mlp_act", "norm_plus_one", "embed_scale", "tie_embeddings", "norm_eps",
              "rope_theta", "qk_norm", "post_norms", "attn_logit_softcap", "final_logit_softcap",
              "sliding_window", "rope_local_theta")
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# Our per-layer norm paths -> HF tensor suffix, as Llama-architecture models name them.
LLAMA_NORMS = {"pre_attention_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
OUR_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def all_full(num_layers: int) -> tuple[str, ...]:
    return (FULL,) * num_layers


def _none(_: Any) -> dict:
    return {}


def _accept(_: Mapping) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str
    hf_architecture: str
    template: str
    defaults: Mapping[str, Any]
    free: frozenset = frozenset()
    layer_types: Callable[[int], tuple[str, ...]] = all_full
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    norm_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(LLAMA_NORMS))
    config_from_hf: Callable[[Mapping], dict] = _none
    config_to_hf: Callable[[Any], dict] = _none
    check_hf: Callable[[Mapping], None] = _accept
    nope_layers: Callable[[int], tuple[int, ...]] | None = None
    hf_activation_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    llava_applies_final_softcap: bool = False

    def __post_init__(self):
        missing = sorted(set(STRUCTURAL) - set(self.defaults))
        if missing:
            raise TypeError(f"family {self.name!r} gives no default for {missing}")


# ----------------------------------------------------------------------------- HF helpers

def require(d: Mapping[str, Any], field: str) -> Any:
    if d.get(field) is None:
        raise ConversionError(f"HF config field {field!r} is missing")
    return d[field]


def reject(field: str, value: Any, supported: str) -> None:
    raise ConversionError(f"HF config field {field}={value!r} is not supported (supported: {supported})")


def rope_from_hf(params: Mapping[str, Any], field: str, theta_default: float) -> dict:
    """Our rope fields from one HF rope dict ({"rope_type", "rope_theta", "factor", ...})."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        reject(f"{field}.partial_rotary_factor", params["partial_rotary_factor"], "1.0")
    out = dict(rope_theta=float(params.get("rope_theta", theta_default)))
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return dict(out, rope_scaling_type="linear", rope_scaling_factor=float(require(params, "factor")))
    if rope_type != "llama3":
        reject(f"{field}.rope_type", rope_type, "'default', 'linear', 'llama3'")
    for key in LLAMA3_ROPE_KEYS:
        if params.get(key) is None:
            raise ConversionError(f"HF config field {field}.{key} is missing (needed by rope_type 'llama3')")
    return dict(out, rope_scaling_type="llama3", rope_scaling_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def flat_rope_from_hf(d: Mapping[str, Any]) -> dict:
    """rope fields from 5.x `rope_parameters` or 4.x `rope_theta` / `rope_scaling` (one dict
    shared by every layer)."""
    field = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = dict(d.get(field) or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        reject(field, params, "one flat dict shared by every layer")
    if "partial_rotary_factor" in d and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = d["partial_rotary_factor"]
    return rope_from_hf(params, field, d.get("rope_theta", 10000.0))


def rope_to_hf(cfg: Any, theta: float | None = None, scaled: bool = True) -> dict:
    """One HF rope dict for `cfg`'s rope (theta overridden for a family's local layers)."""
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta if theta is None else theta}
    if scaled and cfg.rope_scaling is not None:
        out = dict(cfg.rope_scaling, rope_theta=out["rope_theta"])
    return out


def shared_config_from_hf(d: Mapping[str, Any], family: Family) -> dict:
    """The DecoderConfig fields every family reads the same way from an HF config.json."""
    defaults = family.hf_defaults
    hidden_size = int(require(d, "hidden_size"))
    num_heads = int(require(d, "num_attention_heads"))
    act_field = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
    act = d.get(act_field) or defaults.get("hidden_act", "silu")
    act = family.hf_activation_aliases.get(act, act)
    if act not in HF_ACTIVATIONS:
        reject(act_field, act, str(tuple(HF_ACTIVATIONS)))
    if d.get("attention_dropout", 0.0):
        reject("attention_dropout", d["attention_dropout"], "0.0")
    if d.get("mlp_bias", False):
        reject("mlp_bias", d["mlp_bias"], "False")
    for field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if d.get(field):
            reject(field, d[field], "None (dense MLPs only, no mixture of experts)")
    if d.get("use_bidirectional_attention"):
        reject("use_bidirectional_attention", d["use_bidirectional_attention"], "None/False")
    num_layers = int(require(d, "num_hidden_layers"))
    layer_types = tuple(d.get("layer_types") or ())
    if layer_types:
        bad = sorted(set(layer_types) - set(LAYER_TYPES))
        if bad:
            reject("layer_types", bad, str(list(LAYER_TYPES)))
        if len(layer_types) != num_layers:
            reject("layer_types", f"{len(layer_types)} entries", f"one per layer ({num_layers})")
    head_dim = d.get("head_dim") or defaults.get("head_dim") or hidden_size // num_heads
    return dict(
        family=family.name,
        vocab_size=int(require(d, "vocab_size")),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        mlp_dim=int(require(d, "intermediate_size")),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        mlp_act=HF_ACTIVATIONS[act],
        tie_embeddings=bool(d.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
        max_position_embeddings=int(d.get("max_position_embeddings")
                                    or defaults.get("max_position_embeddings", 4096)),
        layer_types=layer_types or None,
    )


def shared_config_to_hf(cfg: Any, family: Family) -> dict:
    return {
        "model_type": family.hf_model_type,
        "architectures": [family.hf_architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": OUR_ACTIVATIONS[cfg.mlp_act],
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_to_hf(cfg),
        "attention_dropout": 0.0,
        "dtype": cfg.param_dtype,
    }


def sliding_from_hf(d: Mapping[str, Any], enabled: bool = True) -> dict:
    """sliding_window and layer_types from an HF config whose `layer_types` names its sliding
    layers; when `enabled` is False (Qwen's use_sliding_window) every layer attends fully."""
    num_layers = int(require(d, "num_hidden_layers"))
    layer_types = tuple(d.get("layer_types") or all_full(num_layers))
    window = d.get("sliding_window") if enabled else None
    if SLIDING not in layer_types or not window:
        return dict(sliding_window=0, layer_types=all_full(num_layers))
    return dict(sliding_window=int(window), layer_types=layer_types)
