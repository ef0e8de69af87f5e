"""Qwen3 (dense): Qwen2 without the q/k/v biases, with an RMSNorm over each head of q and k
before RoPE; head_dim is its own field (128 in every size), embeddings tied in the small ones."""
from vlm_jax.models.families import base, qwen2

DEFAULTS = dict(qwen2.DEFAULTS, qkv_bias=False, qk_norm=True)


def check_hf(d):
    if d.get("attention_bias", False):
        base.reject("attention_bias", d["attention_bias"], "False (Qwen3 with q/k/v/o biases)")


def config_to_hf(cfg):
    return dict(qwen2.qwen_sliding_to_hf(cfg), attention_bias=False)


FAMILY = base.Family(
    name="qwen3", hf_model_type="qwen3", hf_architecture="Qwen3ForCausalLM", template="chatml",
    defaults=DEFAULTS,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "sliding_window"}),
    hf_defaults=dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768,
                     head_dim=128),
    norm_names={**base.LLAMA_NORMS, "attention/q_norm": "self_attn.q_norm",
                "attention/k_norm": "self_attn.k_norm"},
    config_from_hf=qwen2.config_from_hf, config_to_hf=config_to_hf, check_hf=check_hf)
