"""Llama 2 / 3 / 3.2 (and every Llama-architecture model: SmolLM2, TinyLlama, Vicuna, ...):
SwiGLU MLP, RMSNorm(w), no biases; optional Llama-3 rope scaling; tied embeddings for the small
Llama 3.2 models."""
from vlm_jax.models.families import base

DEFAULTS = dict(qkv_bias=False, mlp_act="silu", norm_plus_one=False, embed_scale=False,
                tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0, qk_norm=False,
                post_norms=False, attn_logit_softcap=0.0, final_logit_softcap=0.0,
                sliding_window=0, rope_local_theta=0.0)


def check_hf(d):
    if d.get("attention_bias", False):
        base.reject("attention_bias", d["attention_bias"], "False (q/k/v biases: model_type qwen2)")


def config_to_hf(cfg):
    return {"attention_bias": False, "mlp_bias": False}


FAMILY = base.Family(
    name="llama", hf_model_type="llama", hf_architecture="LlamaForCausalLM", template="llama3",
    defaults=DEFAULTS, free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act"}),
    hf_defaults=dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048),
    config_from_hf=base.flat_rope_from_hf, config_to_hf=config_to_hf, check_hf=check_hf)
