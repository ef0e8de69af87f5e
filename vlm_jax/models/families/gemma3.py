"""Gemma 3 (text; the language model of Gemma 3 VLMs): Gemma 2's sandwich norms plus a (1 + w)
RMSNorm over each head of q and k, five sliding-window layers (local RoPE base 10k) to one
full-attention layer (RoPE base 1M, with the config's rope scaling, e.g. linear x8), soft-caps
only where the config sets them (none in the released models)."""
from vlm_jax.models.families import base, gemma, gemma2

DEFAULTS = dict(gemma2.DEFAULTS, qk_norm=True, attn_logit_softcap=0.0, final_logit_softcap=0.0,
                sliding_window=4096, rope_theta=1000000.0, rope_local_theta=10000.0)
PATTERN = 6  # HF's sliding_window_pattern: every 6th layer attends fully


def pattern(num_layers, every=PATTERN):
    return tuple(base.SLIDING if (i + 1) % every else base.FULL for i in range(num_layers))


def rope_from_hf(d):
    """5.x rope_parameters keyed by layer type, or 4.x rope_theta / rope_local_base_freq /
    rope_scaling (the scaling applies to the full-attention layers only)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        full = base.rope_from_hf(params["full_attention"], "rope_parameters.full_attention", 1e6)
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            base.reject("rope_parameters.sliding_attention.rope_type", local["rope_type"], "'default'")
        return dict(full, rope_local_theta=float(local.get("rope_theta", 10000.0)))
    scaling = dict(d.get("rope_scaling") or {})
    full = base.rope_from_hf(dict(scaling, rope_theta=d.get("rope_theta", 1e6)), "rope_scaling", 1e6)
    return dict(full, rope_local_theta=float(d.get("rope_local_base_freq", 10000.0)))


def config_from_hf(d):
    num_layers = int(base.require(d, "num_hidden_layers"))
    layers = d.get("layer_types") or pattern(num_layers, int(d.get("sliding_window_pattern", PATTERN)))
    return dict(rope_from_hf(d), **gemma2.softcaps_from_hf(d, None, None),
                **base.sliding_from_hf(dict(d, layer_types=layers,
                                            sliding_window=d.get("sliding_window", 4096))))


def config_to_hf(cfg):
    rope = {"full_attention": base.rope_to_hf(cfg),
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    return dict(gemma2.softcaps_to_hf(cfg), rope_parameters=rope)


FAMILY = base.Family(
    name="gemma3", hf_model_type="gemma3_text", hf_architecture="Gemma3ForCausalLM",
    template="gemma", defaults=DEFAULTS,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "attn_logit_softcap",
                    "final_logit_softcap", "sliding_window", "rope_local_theta"}),
    layer_types=pattern, hf_defaults=dict(gemma.HF_DEFAULTS, max_position_embeddings=131072),
    norm_names={**gemma2.SANDWICH_NORMS, "attention/q_norm": "self_attn.q_norm",
                "attention/k_norm": "self_attn.k_norm"},
    hf_activation_aliases=gemma.ACTIVATION_ALIASES, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, check_hf=gemma.check_hf)
