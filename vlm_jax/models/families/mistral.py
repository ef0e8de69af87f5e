"""Mistral 7B (v0.1): the Llama architecture with a sliding window (4096) on every layer; v0.2 and
later set sliding_window null (plain Llama attention, 32k RoPE base 1e6). head_dim its own field
(Mistral-Nemo: 128 with hidden 5120).

Written as the check of this package's claim: this file and its name in `__init__.NAMES` are
all a new family needed (config, HF mapping, tensors, template, training, cached decoding)."""
from vlm_jax.models.families import base, llama

DEFAULTS = dict(llama.DEFAULTS, sliding_window=4096)


def every_layer(num_layers):
    return (base.SLIDING,) * num_layers


def config_from_hf(d):
    num_layers = int(base.require(d, "num_hidden_layers"))
    window = d.get("sliding_window", 4096)
    return dict(base.flat_rope_from_hf(d), **base.sliding_from_hf(
        dict(d, layer_types=every_layer(num_layers), sliding_window=window)))


def config_to_hf(cfg):
    if base.FULL in cfg.layer_types and base.SLIDING in cfg.layer_types:
        base.reject("layer_types", sorted(set(cfg.layer_types)),
                    "all sliding or all full (MistralForCausalLM has one window for every layer)")
    return {"sliding_window": cfg.sliding_window or None, "attention_bias": False, "mlp_bias": False}


FAMILY = base.Family(
    name="mistral", hf_model_type="mistral", hf_architecture="MistralForCausalLM",
    template="llama2", defaults=DEFAULTS, layer_types=every_layer,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "sliding_window"}),
    hf_defaults=dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, check_hf=llama.check_hf)
