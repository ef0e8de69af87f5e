"""Gemma 1: tanh-GeGLU MLP, RMSNorm stored as w and applied as (1 + w), token embeddings scaled
by sqrt(hidden_size) (image features spliced in afterwards are not), head_dim its own field,
tied LM head."""
from vlm_jax.models.families import base

DEFAULTS = dict(qkv_bias=False, mlp_act="gelu_tanh", norm_plus_one=True, embed_scale=True,
                tie_embeddings=True, norm_eps=1e-6, rope_theta=10000.0, qk_norm=False,
                post_norms=False, attn_logit_softcap=0.0, final_logit_softcap=0.0,
                sliding_window=0, rope_local_theta=0.0)
HF_DEFAULTS = dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=8192, head_dim=256)
# transformers rewrites Gemma's legacy hidden_act "gelu" to the tanh approximation.
ACTIVATION_ALIASES = {"gelu": "gelu_pytorch_tanh"}


def check_hf(d):
    if d.get("attention_bias", False):
        base.reject("attention_bias", d["attention_bias"], "False")


def config_to_hf(cfg):
    return {"attention_bias": False}


FAMILY = base.Family(
    name="gemma", hf_model_type="gemma", hf_architecture="GemmaForCausalLM", template="gemma",
    defaults=DEFAULTS, free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act"}),
    hf_defaults=HF_DEFAULTS, hf_activation_aliases=ACTIVATION_ALIASES,
    config_from_hf=base.flat_rope_from_hf, config_to_hf=config_to_hf, check_hf=check_hf)
