"""vlm_jax: train vision-language models (SigLIP encoder + projector + decoder LLM) in JAX/Flax.

    import vlm_jax
    model = vlm_jax.load("ckpt/")            # a directory from `vlm-jax import-hf` or training
    logits = model.logits(input_ids=..., pixel_values=...)   # what an HF LlavaProcessor gives
"""

__version__ = "0.1.0"


def load(checkpoint: str, dtype: str | None = None):
    """Load a model directory (f32 compute unless `dtype`); see `vlm_jax.api.LoadedModel`."""
    from vlm_jax.api import load as _load
    return _load(checkpoint, dtype=dtype)
