"""Gemma 2 (and PaliGemma 2's text side): Gemma plus a norm after attention and after the MLP
("sandwich" norms), tanh soft-caps on the attention logits (50) and the final logits (30),
attention scaled by query_pre_attn_scalar ** -0.5, and a sliding window (4096) on every other
layer, starting with the first.

transformers' Gemma2ForCausalLM and PaliGemma apply the final-logit soft-cap; its LLaVA over a
Gemma 2 text model does not (`llava_applies_final_softcap`), so such a model cannot export as
LLaVA unchanged (the exporter refuses it and the custom format keeps it)."""
from vlm_jax.models.families import base, gemma

DEFAULTS = dict(gemma.DEFAULTS, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                sliding_window=4096)
SANDWICH_NORMS = {"pre_attention_norm": "input_layernorm",
                  "post_attention_norm": "post_attention_layernorm",
                  "pre_mlp_norm": "pre_feedforward_layernorm",
                  "post_mlp_norm": "post_feedforward_layernorm"}


def alternating(num_layers):
    """Sliding on layers 0, 2, 4, ...; full attention on 1, 3, 5, ... (HF's default)."""
    return tuple(base.SLIDING if (i + 1) % 2 else base.FULL for i in range(num_layers))


def softcaps_from_hf(d, attn_default, final_default):
    return dict(attn_logit_softcap=float(d.get("attn_logit_softcapping", attn_default) or 0.0),
                final_logit_softcap=float(d.get("final_logit_softcapping", final_default) or 0.0),
                query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)))


def softcaps_to_hf(cfg):
    return {"hidden_activation": base.OUR_ACTIVATIONS[cfg.mlp_act],
            # HF types it int (256, 144); a fractional value stays a float
            "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar)
                                      if float(cfg.query_pre_attn_scalar).is_integer()
                                      else cfg.query_pre_attn_scalar),
            "attn_logit_softcapping": cfg.attn_logit_softcap or None,
            "final_logit_softcapping": cfg.final_logit_softcap or None,
            "sliding_window": cfg.sliding_window or None, "layer_types": list(cfg.layer_types),
            "attention_bias": False}


def config_from_hf(d):
    layers = d.get("layer_types") or alternating(int(base.require(d, "num_hidden_layers")))
    return dict(base.flat_rope_from_hf(d), **softcaps_from_hf(d, 50.0, 30.0),
                **base.sliding_from_hf(dict(d, layer_types=layers,
                                            sliding_window=d.get("sliding_window", 4096))))


FAMILY = base.Family(
    name="gemma2", hf_model_type="gemma2", hf_architecture="Gemma2ForCausalLM", template="gemma",
    defaults=DEFAULTS,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "attn_logit_softcap",
                    "final_logit_softcap", "sliding_window"}),
    layer_types=alternating, hf_defaults=gemma.HF_DEFAULTS, norm_names=SANDWICH_NORMS,
    hf_activation_aliases=gemma.ACTIVATION_ALIASES, config_from_hf=config_from_hf,
    config_to_hf=softcaps_to_hf, check_hf=gemma.check_hf)
