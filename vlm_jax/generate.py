"""Greedy decoding of short answers by full recomputation (no KV cache): the evaluator's generator.

    tokens, lengths = greedy_generate(model_config, params, input_ids, prompt_lengths, images,
                                      max_new_tokens=4, stop_ids=(tokenizer.eos_id,))

Every step runs the decoder over the whole (fixed-size) sequence and reads the logits at each
row's last real position; the image is encoded once, before the loop. For answers of a few
tokens on tiny models this costs little more than a cache would, and one compiled program serves
every step. Rows are right-padded: padding after a row's last token is invisible to it under the
causal mask, so rows of different prompt lengths share a batch.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers
from vlm_jax.models.vlm import VLM, VLMConfig


def greedy_generate(model_config: VLMConfig, params: dict, input_ids: np.ndarray,
                    prompt_lengths: np.ndarray, images: np.ndarray | None, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuation of right-padded prompts.

    input_ids: i32[B, T] prompts (image tokens already expanded), right-padded;
    prompt_lengths: i32[B] real tokens per row (>= 1); images: f32[B, M, H, W, 3] or None.
    Returns (tokens i32[B, max_new_tokens], lengths i32[B]): the generated ids, and how many come
    before the first stop id (the stop id itself is not counted; ids after it are 0).
    """
    input_ids = np.asarray(input_ids, np.int32)
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    if input_ids.ndim != 2 or prompt_lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"input_ids must be [B, T] and prompt_lengths [B], got "
                         f"{input_ids.shape} and {prompt_lengths.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_lengths.min(initial=1) < 1 or prompt_lengths.max(initial=0) > input_ids.shape[1]:
        raise ValueError(f"prompt_lengths must lie in [1, {input_ids.shape[1]}]")
    total = input_ids.shape[1] + max_new_tokens
    padded = np.zeros((input_ids.shape[0], total), np.int32)
    padded[:, :input_ids.shape[1]] = input_ids
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
    tokens, lengths = _generate(model_config, max_new_tokens, params, jnp.asarray(padded),
                                jnp.asarray(prompt_lengths), None if images is None
                                else jnp.asarray(images, jnp.float32), jnp.asarray(stops))
    return np.asarray(tokens), np.asarray(lengths)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(model_config: VLMConfig, max_new_tokens: int, params: dict, ids: jax.Array,
              prompt_lengths: jax.Array, images: jax.Array | None, stops: jax.Array):
    model = VLM(model_config)
    batch, total = ids.shape
    embeds = model.apply({"params": params}, ids, images, method=VLM.embed)   # [B, T, D]
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
    mask = layers.make_attention_mask(jnp.ones((batch, total), jnp.int32))
    rows = jnp.arange(batch)

    def decode(module, x):
        return module.llm(x, positions, mask)

    def step(i, carry):
        embeds, tokens, done, lengths = carry
        logits = model.apply({"params": params}, embeds, method=decode)       # [B, T, V]
        last = logits[rows, prompt_lengths + i - 1]                            # [B, V]
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        is_stop = jnp.any(token[:, None] == stops[None, :], axis=-1)
        token = jnp.where(done | is_stop, 0, token)
        lengths = lengths + (~done & ~is_stop).astype(jnp.int32)
        done = done | is_stop
        tokens = tokens.at[:, i].set(token)
        new_embed = model.apply({"params": params}, token[:, None], None, method=VLM.embed)
        embeds = embeds.at[rows, prompt_lengths + i].set(new_embed[:, 0].astype(embeds.dtype))
        return embeds, tokens, done, lengths

    init = (embeds, jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.int32))
    _, tokens, _, lengths = jax.lax.fori_loop(0, max_new_tokens, step, init)
    return tokens, lengths
