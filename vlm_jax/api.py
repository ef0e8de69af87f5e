"""The Python API: `vlm_jax.load(CKPT)` -> a model that takes what an HF LlavaProcessor produces."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import model_dir
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.errors import InputError
from vlm_jax.models.vlm import VLM, VLMConfig, check_image_placeholders, with_run_settings


@dataclasses.dataclass
class LoadedModel:
    """A model directory in memory: `config`, `params`, `tokenizer` (None if it had none), and
    what training fed it: `template` (chat template name, None when unknown),
    `pad_to_square` (image preprocessing), `prefix_lm` (prompts attend bidirectionally) and
    `tiling` (large images as tiles, data/tiling.py)."""
    config: VLMConfig
    params: Any
    tokenizer: Any
    template: str | None = None
    pad_to_square: bool = False
    prefix_lm: bool = False
    tiling: TilingConfig = TilingConfig()

    def __post_init__(self):
        self.model = VLM(self.config)
        self._forward = jax.jit(lambda params, **kw: self.model.apply({"params": params}, **kw))

    def logits(self, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
        """f32[B, T, vocab] logits, HF-style inputs.

        input_ids: int[B, T] with the image token already expanded (tokens_per_image copies per
        image, as LlavaProcessor does). pixel_values: f32[num_images, 3, H, W], images in the order
        their placeholders appear in the batch (row by row), or None for text only.
        attention_mask: int[B, T], 1 = real token, 0 = padding (padding keys are never attended).
        Positions are 0..T-1 as in HF's forward without position_ids.
        """
        input_ids = np.asarray(input_ids, np.int32)
        b, t = input_ids.shape
        images = None
        if pixel_values is not None:
            if self.config.vision is None:
                raise InputError("pixel_values given but this model has no vision tower")
            images = self._images_per_row(input_ids, np.asarray(pixel_values, np.float32))
        elif self.config.vision is not None and self.config.llm is not None:
            check_image_placeholders(input_ids, 0, self.config.image_token_id,
                                     self.config.tokens_per_image)
        segment_ids = None if attention_mask is None else np.asarray(attention_mask, np.int32)
        out = self._forward(self.params, input_ids=jnp.asarray(input_ids), images=images,
                            positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                            mask_ar=jnp.ones((b, t), jnp.int32),
                            segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
        return np.asarray(out)

    def _images_per_row(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> jnp.ndarray:
        """[num_images, 3, H, W] in batch order -> f32[B, M, H, W, 3] (rows padded with zeros)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"pixel_values must be f32[num_images, 3, H, W], got {pixel_values.shape}")
        per_image = self.config.tokens_per_image
        counts = (input_ids == self.config.image_token_id).sum(axis=1)
        if (counts % per_image).any() or counts.sum() // per_image != len(pixel_values):
            raise InputError(
                f"input_ids hold {counts.tolist()} image tokens per row ({per_image} per image) "
                f"but {len(pixel_values)} image(s) were given")
        num_images = counts // per_image
        check_image_placeholders(input_ids, num_images, self.config.image_token_id, per_image)
        m = max(int(num_images.max()), 1)
        nhwc = pixel_values.transpose(0, 2, 3, 1)
        images = np.zeros((len(input_ids), m) + nhwc.shape[1:], np.float32)
        start = 0
        for row, n in enumerate(num_images):
            images[row, :n] = nhwc[start:start + n]
            start += n
        return jnp.asarray(images)


def load(checkpoint: str, dtype: str | None = None) -> LoadedModel:
    """Load a model directory written by `vlm-jax import-hf` or by training. It computes in f32
    unless `dtype` says otherwise (how a model was trained to compute is not part of it)."""
    config, params, tokenizer = model_dir.load_model(checkpoint)
    config = with_run_settings(config, dtype=dtype)
    data = model_dir.load_data_settings(checkpoint)
    return LoadedModel(config, params, tokenizer, data["template"], data["pad_to_square"],
                       data["prefix_lm"], data["tiling"])
