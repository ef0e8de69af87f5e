"""SmolLM3: the Llama architecture with RoPE left out of every 4th layer (NoPE layers, HF's
`no_rope_layers` / `no_rope_layer_interval`), tied embeddings. (SmolLM2 is plain `llama`.)"""
from vlm_jax.models.families import base, llama

DEFAULTS = dict(llama.DEFAULTS, tie_embeddings=True, norm_eps=1e-6)
INTERVAL = 4


def every_fourth(num_layers, interval=INTERVAL):
    """The layers without RoPE: 3, 7, 11, ... (HF: (i + 1) % interval == 0)."""
    return tuple(i for i in range(num_layers) if (i + 1) % interval == 0)


def config_from_hf(d):
    num_layers = int(base.require(d, "num_hidden_layers"))
    flags = d.get("no_rope_layers")
    if flags is None:
        nope = every_fourth(num_layers, int(d.get("no_rope_layer_interval", INTERVAL)))
    else:
        nope = tuple(i for i in range(num_layers) if not flags[i])
    sliding = {}
    if d.get("use_sliding_window") and d.get("sliding_window"):
        layers = d.get("layer_types") or [base.FULL if i not in nope else base.SLIDING
                                          for i in range(num_layers)]
        sliding = base.sliding_from_hf(dict(d, layer_types=layers))
    else:
        sliding = base.sliding_from_hf(d, enabled=False)
    return dict(base.flat_rope_from_hf(d), nope_layers=nope, **sliding)


def config_to_hf(cfg):
    return {"no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
            "use_sliding_window": cfg.sliding_window > 0, "sliding_window": cfg.sliding_window or None,
            "layer_types": list(cfg.layer_types), "attention_bias": False, "mlp_bias": False}


FAMILY = base.Family(
    name="smollm3", hf_model_type="smollm3", hf_architecture="SmolLM3ForCausalLM",
    template="chatml", defaults=DEFAULTS,
    free=frozenset({"tie_embeddings", "norm_eps", "rope_theta", "mlp_act", "sliding_window"}),
    nope_layers=every_fourth,
    hf_defaults=dict(tie_word_embeddings=True, hidden_act="silu", max_position_embeddings=32768),
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, check_hf=llama.check_hf)
