"""Text generation with a KV cache (greedy or sampled) and scoring of given completions.

    tokens, lengths = generate(model_config, params, input_ids, prompt_lengths, images,
                               max_new_tokens=32, sampling=Sampling(temperature=0.7, top_p=0.9),
                               stop_ids=(tokenizer.eos_id,), stop_sequences=[[13, 13]])
    logprobs = score(model_config, params, prompt_ids, completion_ids, images)

Batches are **right-padded**: row b's prompt is input_ids[b, :prompt_lengths[b]] (image tokens
already expanded). One prefill runs the whole [B, T] block (images encoded once) under a causal
mask (bidirectional over each row's first `prefix_lengths` tokens, for prefix-LM models) and
writes every position's k/v into a cache of T + max_new_tokens slots; padding after a row's
prompt is invisible to it. Row b's n-th new token then sits at position and cache slot
prompt_lengths[b] + n, overwriting the padding's k/v, and each step reads only the slots before
it. The steps run inside one `jax.lax.while_loop` (no Python per token) that exits when every row
has stopped.

Speed (decode is memory-bound: each step reads every LLM weight once): the layers run unrolled
on per-layer weight arrays (`per_layer_params`), so no step copies a weight out of the scanned
[L, ...] stacks, and each layer's cache is its own [B, K, S, hd] array (heads first), so the
one-query attention reads it in place with no per-step transpose. Prefill and every decode step
run the model's own `DecoderBlock` with a `KVCache` (models/decoder.py: the attention math, soft-
caps, sliding windows and per-layer RoPE live there only); this file keeps the loop, the sampler
and the cache layout.

Stopping: a row stops at the first of its stop ids or stop sequences (token-id sequences matched
on the generated ids inside the loop); the stop itself is not part of the output. Stop *strings*
can tokenize differently in context, so callers also cut decoded text with
`prompts.trim_at_stop_strings`. How prompts are grouped into batches: `batching.py`.
Sampling draws each step's tokens with `fold_in(key(seed), step)`: a fixed seed reproduces the
same tokens, on one device or on a mesh.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers
from vlm_jax.models.cross_attention import CrossAttentionBlock, block_slots
from vlm_jax.models.decoder import Decoder, DecoderBlock, KVCache, layer_specs
from vlm_jax.models.vlm import VLM, VLMConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is chosen from the logits. temperature 0 = greedy (argmax; top_k/top_p unused).
    top_k 0 = no top-k cut; top_p 1.0 = no nucleus cut (both cuts may be combined)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; supported: >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; supported: >= 0 (0 = no top-k cut)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; supported: (0, 1] (1 = no nucleus cut)")


GREEDY = Sampling()


def generate(model_config: VLMConfig, params: dict, input_ids: np.ndarray,
             prompt_lengths: np.ndarray, images: np.ndarray | None, max_new_tokens: int,
             sampling: Sampling = GREEDY, stop_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (),
             prefix_lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Continue right-padded prompts.

    input_ids: i32[B, T] (image tokens expanded), right-padded; prompt_lengths: i32[B] (>= 1);
    images: f32[B, M, H, W, 3] or None. Returns (tokens i32[B, max_new_tokens], lengths i32[B]):
    the new ids and how many come before the first stop (ids from there on are 0).
    prefix_lengths: i32[B] or None. For a model trained with `data.prefix_lm=True` (PaliGemma
    style): row b's first prefix_lengths[b] tokens (images + first question) attend to each
    other bidirectionally, as in training; the rest of the prompt and every new token are causal.
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
    if prefix_lengths is None:
        prefix_lengths = np.zeros_like(prompt_lengths)
    prefix_lengths = np.asarray(prefix_lengths, np.int32)
    if prefix_lengths.shape != prompt_lengths.shape or np.any(prefix_lengths < 0) or \
            np.any(prefix_lengths > prompt_lengths):
        raise ValueError("prefix_lengths must be [B] with 0 <= prefix_lengths <= prompt_lengths")
    stop_table, stop_lengths = _stop_table(stop_ids, stop_sequences)
    sampler = (sampling.temperature, sampling.top_k, sampling.top_p)
    layer_params = per_layer_params(params["llm"]["layers"], model_config.llm.num_layers)
    cross_params = []
    if model_config.fusion == "cross_attention":
        cross_params = per_layer_params(params["cross_attention"],
                                        len(model_config.cross_attention_layers))
    tokens, lengths = _generate(
        model_config, max_new_tokens, sampler, params, layer_params, cross_params,
        jnp.asarray(input_ids),
        jnp.asarray(prompt_lengths), jnp.asarray(prefix_lengths),
        None if images is None else jnp.asarray(images, jnp.float32),
        jnp.asarray(stop_table), jnp.asarray(stop_lengths), jax.random.key(sampling.seed))
    return np.asarray(tokens), np.asarray(lengths)


def greedy_generate(model_config: VLMConfig, params: dict, input_ids: np.ndarray,
                    prompt_lengths: np.ndarray, images: np.ndarray | None, max_new_tokens: int,
                    stop_ids: Sequence[int] = (),
                    prefix_lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`generate` with argmax decoding (the evaluator's entry point)."""
    return generate(model_config, params, input_ids, prompt_lengths, images, max_new_tokens,
                    GREEDY, stop_ids, prefix_lengths=prefix_lengths)


def _stop_table(stop_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]]):
    """Stops as right-aligned rows i32[N, Lmax] (left fill -1) and their lengths i32[N]; one
    empty (never matching) row when there are none, so the program's shapes stay valid."""
    sequences = [[int(i)] for i in stop_ids] + [[int(i) for i in s] for s in stop_sequences]
    if any(len(s) == 0 for s in sequences):
        raise ValueError("an empty stop sequence would stop every row at once")
    sequences = list(dict.fromkeys(map(tuple, sequences))) or [()]
    width = max(max(len(s) for s in sequences), 1)
    table = np.full((len(sequences), width), -1, np.int32)
    for row, seq in enumerate(sequences):
        if seq:
            table[row, width - len(seq):] = seq
    return table, np.asarray([len(s) for s in sequences], np.int32)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
    """logits f32[B, V] -> i32[B]: argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest and to the smallest set of
    most likely tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    keep = top_k if 0 < top_k < vocab else vocab
    values, indices = jax.lax.top_k(logits, keep)  # [B, keep], descending
    values = values / temperature
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the most likely token always stays
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


def _match_stops(history: jax.Array, step: jax.Array, table: jax.Array, lengths: jax.Array):
    """Which rows end in a stop after new token `step`; history i32[B, Lmax - 1 + N] holds token
    n at column Lmax - 1 + n (-1 before the first). -> (hit bool[B], matched length i32[B])."""
    width = table.shape[1]
    window = jax.lax.dynamic_slice_in_dim(history, step, width, axis=1)  # [B, Lmax]
    counts = jnp.arange(width)[None, :] >= width - lengths[:, None]     # [N, Lmax]
    hit = jnp.all((window[:, None, :] == table[None]) | ~counts[None], axis=-1)
    hit = hit & (lengths[None, :] > 0)                                   # [B, N]
    return jnp.any(hit, axis=-1), jnp.max(jnp.where(hit, lengths[None, :], 0), axis=-1)


# The CPU backend's last splits of stacked layer weights, (the stacked leaves, per-layer trees):
# the decoder's layers and, with cross-attention fusion, its cross-attention blocks.
_LAYER_SPLIT_CACHE: list = []
_KEPT_SPLITS = 2


def per_layer_params(stacked: dict, num_layers: int) -> list[dict]:
    """The scanned decoder's layer params [L, ...] as L per-layer trees.

    Why: inside a compiled loop XLA:CPU copies a layer's weights out of the stacked arrays
    before every matmul (a dynamic-slice is materialised, not fused), so a decode step that
    scans over layers moves each weight three times (read, write, read again) where once is
    enough; a static split inside the program costs a fresh 1x copy per call, whose page faults
    showed up in time-to-first-token. On CPU the split of the last params used is therefore
    kept (one extra copy of the LLM's layer weights, `clear_layer_cache()` frees it) and reused
    while the same arrays are passed again; other backends split per call.
    """
    leaves = jax.tree.leaves(stacked)
    for cached_leaves, split in _LAYER_SPLIT_CACHE:
        if len(cached_leaves) == len(leaves) and all(a is b for a, b in zip(cached_leaves, leaves)):
            return split
    split = _split_layers(stacked, num_layers)
    if jax.default_backend() == "cpu":
        _LAYER_SPLIT_CACHE[:] = _LAYER_SPLIT_CACHE[-(_KEPT_SPLITS - 1):] + [(leaves, split)]
    return split


def clear_layer_cache() -> None:
    """Drop the kept per-layer copy of the last generated-with weights (see per_layer_params)."""
    _LAYER_SPLIT_CACHE.clear()


@functools.partial(jax.jit, static_argnums=(1,))
def _split_layers(stacked: dict, num_layers: int) -> list[dict]:
    return [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(num_layers)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(model_config: VLMConfig, max_new_tokens: int, sampler: tuple, params: dict,
              layer_params: list[dict], cross_params: list[dict], ids: jax.Array,
              prompt_lengths: jax.Array,
              prefix_lengths: jax.Array, images: jax.Array | None,
              stop_table: jax.Array, stop_lengths: jax.Array, key: jax.Array):
    llm_config = model_config.resolved("llm")
    decoder = Decoder(llm_config)
    llm_params = {"params": params["llm"]}
    batch, prompt_width = ids.shape
    cache_length = prompt_width + max_new_tokens
    slots = jnp.arange(cache_length)
    layer_params = [{"params": p} for p in layer_params]  # per_layer_params: why
    block = DecoderBlock(llm_config)
    specs = layer_specs(llm_config)
    cross_block = CrossAttentionBlock(llm_config)
    cross_params = [{"params": p} for p in cross_params]
    cross_slots = block_slots(model_config.cross_attention_layers, llm_config.num_layers)

    # Prefill: the model's own blocks over the padded prompt block, each layer's k/v written to
    # its cache's slots 0 .. T-1. Causal after each row's prefix (mask_ar 1; a prefix of 0 = all
    # causal), so the padding after a row's prompt is invisible to it.
    x = VLM(model_config).apply({"params": params}, ids, images, method=VLM.embed)
    x = x.astype(jnp.dtype(llm_config.dtype))
    positions = jnp.broadcast_to(jnp.arange(prompt_width, dtype=jnp.int32), (batch, prompt_width))
    mask_ar = (jnp.arange(prompt_width)[None, :] >= prefix_lengths[:, None]).astype(jnp.int32)
    mask = layers.attention_mask_for(llm_config.attention_backend, mask_ar, None)
    empty = KVCache.empty(batch, llm_config.num_kv_heads, cache_length, llm_config.head_dim, x.dtype)
    # Cross-attention fusion: each block's image keys / values computed once, here; a new token
    # sees every image of its prompt (all markers precede it), the same as the prompt's last.
    cross = None
    if cross_params:
        cross = VLM(model_config).apply({"params": params}, x, ids, images,
                                        method=VLM.cross_inputs)
        image_kv = [cross_block.apply(p, cross.images, method=CrossAttentionBlock.image_kv)
                    for p in cross_params]
        last = (prompt_lengths - 1)[:, None, None]
        step_rows = jnp.take_along_axis(cross.rows, last, axis=1)                # [B, 1, 1]
        step_mask = jnp.take_along_axis(cross.mask[:, 0], last, axis=1)[:, None]  # [B, 1, 1, N]

    def fuse(x, i, mask, rows):
        """Cross-attention block before layer i, if there is one."""
        if cross_slots[i] < 0:
            return x
        slot = int(cross_slots[i])
        return cross_block.apply(cross_params[slot], x, image_kv[slot], mask, rows,
                                 method=CrossAttentionBlock.attend)

    cache = []
    for i, (p, spec) in enumerate(zip(layer_params, specs)):
        if cross is not None:
            x = fuse(x, i, cross.mask, cross.rows)
        x, layer_cache = block.apply(p, x, spec, positions, mask, empty)
        cache.append(layer_cache)
    last = jnp.take_along_axis(x, (prompt_lengths - 1)[:, None, None], axis=1)   # [B, 1, D]
    logits = decoder.apply(llm_params, last, method=_final_logits)

    def step_logits(cache, token, index):
        """Feed token i32[B] at position/slot index i32[B]; -> (logits f32[B, V], cache)."""
        x = decoder.apply(llm_params, token[:, None], method=Decoder.embed)
        visible = (slots[None, :] <= index[:, None])[:, None, None, :]  # bool[B, 1, 1, S]
        new_cache = []
        for i, (p, spec, layer_cache) in enumerate(zip(layer_params, specs, cache)):
            if cross is not None:
                x = fuse(x, i, step_mask, step_rows)
            x, layer_cache = block.apply(p, x, spec, index[:, None], visible, layer_cache, index)
            new_cache.append(layer_cache)
        return decoder.apply(llm_params, x, method=_final_logits), tuple(new_cache)

    stop_width = stop_table.shape[1]
    history = jnp.full((batch, stop_width - 1 + max_new_tokens), -1, jnp.int32)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)

    def emit(state, logits):
        """Choose token `step` from logits and update tokens / stop bookkeeping."""
        step, cache, tokens, history, done, lengths = state
        token = sample_tokens(logits, jax.random.fold_in(key, step), *sampler)
        token = jnp.where(done, 0, token)
        history = history.at[:, stop_width - 1 + step].set(token)
        hit, matched = _match_stops(history, step, stop_table, stop_lengths)
        hit = hit & ~done
        lengths = jnp.where(hit, step + 1 - matched, lengths)
        tokens = tokens.at[:, step].set(token)
        return (step + 1, cache, tokens, history, done | hit, lengths), token

    state, token = emit((jnp.int32(0), tuple(cache), tokens, history, jnp.zeros((batch,), bool),
                         jnp.full((batch,), max_new_tokens, jnp.int32)), logits)

    def cond(carry):
        state, _ = carry
        return (state[0] < max_new_tokens) & ~jnp.all(state[4])

    def body(carry):
        state, token = carry
        step, cache = state[0], state[1]
        logits, cache = step_logits(cache, token, prompt_lengths + step - 1)
        return emit((step, cache) + state[2:], logits)

    state, _ = jax.lax.while_loop(cond, body, (state, token))
    _, _, tokens, _, _, lengths = state
    tokens = jnp.where(jnp.arange(max_new_tokens)[None, :] < lengths[:, None], tokens, 0)
    return tokens, lengths


def _final_logits(decoder: Decoder, x: jax.Array) -> jax.Array:
    """Last block output [B, 1, D] -> logits f32[B, V]."""
    return decoder.logits(decoder.final_norm(x))[:, 0]


# ----------------------------------------------------------------------------- scoring

def token_logprobs(model_config: VLMConfig, params: dict, input_ids: np.ndarray,
                   images: np.ndarray | None, prefix_length: int = 0) -> np.ndarray:
    """f32[B, T - 1]: log p(input_ids[:, t + 1] | input_ids[:, :t + 1], images), causal forward
    (the first `prefix_length` tokens attending to each other both ways: a prefix-LM model)."""
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {input_ids.shape}")
    mask_ar = (np.arange(input_ids.shape[1]) >= prefix_length).astype(np.int32)
    return np.asarray(_token_logprobs(model_config, params, jnp.asarray(input_ids),
                                      None if images is None else jnp.asarray(images, jnp.float32),
                                      jnp.asarray(np.broadcast_to(mask_ar, input_ids.shape))))


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logprobs(model_config, params, ids, images, mask_ar):
    batch, width = ids.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    logits = VLM(model_config).apply({"params": params}, ids, images, positions, mask_ar)
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]


def score(model_config: VLMConfig, params: dict, prompt_ids: Sequence[int],
          completion_ids: Sequence[int], images: np.ndarray | None,
          prefix_lm: bool = False) -> np.ndarray:
    """f32[C]: log-probability of each completion token given the prompt (and images
    f32[1, M, H, W, 3] or None) and the completion tokens before it; `prefix_lm`: the prompt
    attends to itself both ways, as a prefix-LM model was trained."""
    prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
    if not prompt_ids or not completion_ids:
        raise ValueError("score needs a non-empty prompt and a non-empty completion")
    ids = np.asarray([prompt_ids + completion_ids], np.int32)
    logprobs = token_logprobs(model_config, params, ids, images,
                              len(prompt_ids) if prefix_lm else 0)[0]
    return logprobs[len(prompt_ids) - 1:]
