"""Qwen2 / Qwen2.5: Llama plus biases on the q/k/v projections; sliding-window attention on the
layers from `max_window_layers` on when `use_sliding_window` (off in every released model)."""
from vlm_jax.models.families import base, llama

DEFAULTS = dict(llama.DEFAULTS, qkv_bias=True, norm_eps=1e-6, rope_theta=1000000.0)


def qwen_sliding_from_hf(d):
    """HF Qwen2 / Qwen3's rule: without use_sliding_window every layer attends fully; with it
    and no layer_types in config.json, the layers from max_window_layers on slide."""
    if not d.get("use_sliding_window") or not d.get("sliding_window"):
        return base.sliding_from_hf(d, enabled=False)
    if d.get("layer_types"):
        return base.sliding_from_hf(d)
    first = int(d.get("max_window_layers", 28))
    types = [base.SLIDING if i >= first else base.FULL
             for i in range(int(base.require(d, "num_hidden_layers")))]
    return base.sliding_from_hf(dict(d, layer_types=types))


def qwen_sliding_to_hf(cfg):
    return {"use_sliding_window": cfg.sliding_window > 0, "sliding_window": cfg.sliding_window or None,
            "max_window_layers": cfg.num_layers, "layer_types": list(cfg.layer_types)}


def config_from_hf(d):
    return dict(base.flat_rope_from_hf(d), **qwen_sliding_from_hf(d))


FAMILY = base.Family(
    name="qwen2", hf_model_type="qwen2", hf_architecture="Qwen2ForCausalLM", template="qwen2",
    defaults=DEFAULTS,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "sliding_window"}),
    hf_defaults=dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768),
    config_from_hf=config_from_hf, config_to_hf=qwen_sliding_to_hf)
