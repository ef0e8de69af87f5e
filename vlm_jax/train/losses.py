"""Losses: masked next-token cross entropy (per token over the global batch) and SigLIP's sigmoid loss.

Cross entropy is returned as SUMS (masked loss sum, correct-token count, token count) so the
caller normalises once by the token count of the whole global batch: with gradient accumulation
every micro-batch divides by the same total, and the result equals one big batch. Under `jit` on
a mesh, `jnp.sum` over a batch-sharded array is a global reduction, so every device agrees.

The sigmoid loss is computed chunked (big_vision's "chunked" SigLIP): inside `jax.shard_map` each
device keeps its image-embedding shard and passes the text shards around the ring with
`ppermute`, so no device ever holds the full B x B logits.

Image-text matching (BLIP): `hard_negatives` draws, for every image of the global batch, a
caption of another image with probability softmax(similarity) (and for every caption another
image), each device scoring its own rows against the gathered embeddings: [B/n, B] per device;
`itm_loss` is the binary cross entropy of the matching head on positives and those negatives.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def next_token_sums(logits: jax.Array, target_ids: jax.Array, loss_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, T, V] (any float dtype), target_ids i32[B, T], loss_mask f32[B, T] ->
    (sum of masked CE, sum of masked correct argmax, sum of mask), all f32[] scalars.

    log-softmax runs in f32 whatever the logits dtype."""
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)                                     # [B, T]
    target_logit = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    nll = log_norm - target_logit
    correct = (jnp.argmax(logits, axis=-1) == target_ids).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


def _first_argmax(logits: jax.Array, row_max: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (first maximal index) as compare + min: XLA's CPU argmax is a
    variadic (value, index) reduce that does not vectorise and cost more than the LM head."""
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == row_max[..., None], iota, logits.shape[-1]), axis=-1)


def next_token_sums_from_hidden(hidden: jax.Array, head: jax.Array, vocab_axis: int,
                                target_ids: jax.Array, loss_mask: jax.Array,
                                chunk_size: int = 128, soft_cap: float = 0.0
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`next_token_sums(logits, ...)` with logits = the LM head applied to `hidden`, computed only
    where `loss_mask` is non-zero and never materialised whole.

    hidden [B, T, D] (final-normed); head: [V, D] (vocab_axis=0, tied embedding) or [D, V]
    (vocab_axis=1). Each row's loss positions are moved to its front (a stable sort keeps their
    order); a loop then runs over chunks of `chunk_size` positions of all rows, only as many as
    the row with the most loss tokens needs (a dynamic trip count: shapes stay static, the work
    follows the data: packed rows, any image count, any prompt masking). Each chunk computes
    logits [B, C, V] in f32, the loss, the argmax, and at once the gradients of the loss sum
    w.r.t. the chunk's hidden states and the head ("fused linear cross entropy"), so the backward
    pass only scales them and no [*, V] tensor outlives its chunk. `soft_cap` > 0: the logits are
    cap * tanh(hidden @ head / cap) (Gemma 2's final soft-cap), differentiated through the tanh.
    """
    batch, length, _ = hidden.shape
    chunk_size = min(chunk_size, length)  # a row shorter than a chunk is one chunk, unpadded
    has_loss = loss_mask != 0
    order = jnp.argsort(jnp.logical_not(has_loss), axis=-1, stable=True)             # [B, T]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def sort_pad(x):
        x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    most_loss_tokens = jnp.max(jnp.sum(has_loss, axis=-1))
    chunks_needed = (most_loss_tokens + chunk_size - 1) // chunk_size
    head_vd = head if vocab_axis == 0 else head.T
    return _fused_head_ce(sort_pad(hidden), head_vd.astype(hidden.dtype), sort_pad(target_ids),
                          sort_pad(loss_mask.astype(jnp.float32)), chunks_needed, chunk_size,
                          float(soft_cap or 0.0))


def _fused_head_ce_forward(hidden, head, target_ids, weights, chunks_needed, chunk_size, soft_cap):
    """(loss sum, correct sum, token sum) and their gradients w.r.t. hidden and head (see above).
    hidden [B, Tp, D], head [V, D], target_ids i32[B, Tp], weights f32[B, Tp]."""
    batch, _, width = hidden.shape

    def chunk(i, carry):
        loss_sum, correct_sum, grad_hidden, grad_head = carry
        start = i * chunk_size
        h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk_size, axis=1)          # [B, C, D]
        tgt = jax.lax.dynamic_slice_in_dim(target_ids, start, chunk_size, axis=1)    # [B, C]
        w = jax.lax.dynamic_slice_in_dim(weights, start, chunk_size, axis=1)         # [B, C]
        logits = jnp.einsum("bcd,vd->bcv", h, head, preferred_element_type=jnp.float32)
        if soft_cap:
            capped = jnp.tanh(logits / soft_cap)
            logits = soft_cap * capped
        row_max = jnp.max(logits, axis=-1)
        shifted = logits - row_max[..., None]
        log_norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))                        # [B, C]
        target_shifted = jnp.take_along_axis(shifted, tgt[..., None], axis=-1)[..., 0]
        nll = log_norm - target_shifted
        correct = (_first_argmax(logits, row_max) == tgt).astype(jnp.float32)
        # d(sum w * nll)/d logits = w * (softmax - onehot)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        probs = jnp.exp(shifted - log_norm[..., None])
        grad_logits = w[..., None] * (probs - (vocab == tgt[..., None]))
        if soft_cap:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
            grad_logits = grad_logits * (1.0 - jnp.square(capped))
        grad_logits = grad_logits.astype(hidden.dtype)
        grad_h = jnp.einsum("bcv,vd->bcd", grad_logits, head, preferred_element_type=jnp.float32)
        grad_head = grad_head + jnp.einsum("bcv,bcd->vd", grad_logits, h,
                                           preferred_element_type=jnp.float32)
        grad_hidden = jax.lax.dynamic_update_slice_in_dim(
            grad_hidden, grad_h.astype(grad_hidden.dtype), start, axis=1)
        return (loss_sum + jnp.sum(nll * w), correct_sum + jnp.sum(correct * w), grad_hidden,
                grad_head)

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros_like(hidden),
            jnp.zeros(head.shape, jnp.float32))
    loss_sum, correct_sum, grad_hidden, grad_head = jax.lax.fori_loop(0, chunks_needed, chunk, init)
    return (loss_sum, correct_sum, jnp.sum(weights)), (grad_hidden, grad_head.astype(head.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_head_ce(hidden, head, target_ids, weights, chunks_needed, chunk_size, soft_cap):
    return _fused_head_ce_forward(hidden, head, target_ids, weights, chunks_needed, chunk_size,
                                  soft_cap)[0]


def _fused_head_ce_fwd(hidden, head, target_ids, weights, chunks_needed, chunk_size, soft_cap):
    return _fused_head_ce_forward(hidden, head, target_ids, weights, chunks_needed, chunk_size,
                                  soft_cap)


def _fused_head_ce_bwd(chunk_size, soft_cap, grads, cotangents):
    grad_hidden, grad_head = grads
    loss_cotangent = cotangents[0]
    # Only the loss sum is differentiable (the correct count and the mask sum are counts).
    return (grad_hidden * loss_cotangent.astype(grad_hidden.dtype),
            grad_head * loss_cotangent.astype(grad_head.dtype), None, None, None)


_fused_head_ce.defvjp(_fused_head_ce_fwd, _fused_head_ce_bwd)


def next_token_loss(logits: jax.Array, target_ids: jax.Array, loss_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(mean CE per loss token, token accuracy) over the whole batch; 0 when no token counts."""
    loss_sum, correct, count = next_token_sums(logits, target_ids, loss_mask)
    denom = jnp.maximum(count, 1.0)
    return loss_sum / denom, correct / denom


def _pair_loss_sum(zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array, bias: jax.Array,
                   positives_on_diagonal: bool) -> jax.Array:
    """sum over pairs of -log sigmoid(z * (t * x.y + b)) for one image chunk x one text chunk."""
    logits = jnp.einsum("id,jd->ij", zimg, ztxt, preferred_element_type=jnp.float32)
    logits = logits * temperature + bias                                            # [b, b]
    if positives_on_diagonal:
        z = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=jnp.float32) - 1.0
    else:
        z = -1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def sigmoid_loss_reference(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array,
                           logit_bias: jax.Array) -> jax.Array:
    """SigLIP loss on the full B x B matrix (one device; for small batches and checks)."""
    temperature = jnp.exp(logit_scale.reshape(()).astype(jnp.float32))
    total = _pair_loss_sum(zimg.astype(jnp.float32), ztxt.astype(jnp.float32), temperature,
                           logit_bias.reshape(()).astype(jnp.float32), True)
    return total / zimg.shape[0]


def sigmoid_loss_chunked(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array,
                         logit_bias: jax.Array, mesh: Mesh,
                         data_axes: Sequence[str] = ("data", "fsdp")) -> jax.Array:
    """SigLIP sigmoid loss, (1/B) sum_ij -log sigmoid(z_ij (exp(logit_scale) x_i.y_j + logit_bias)),
    z = +1 for matching pairs (i == j), -1 otherwise. zimg, ztxt: L2-normalised f32[B, P], B split
    over `data_axes`; logit_scale/bias f32[1]. Peak memory per device: one [B/n, B/n] block."""
    data_axes = tuple(a for a in data_axes if mesh.shape[a] > 1) or tuple(data_axes[:1])
    num_chunks = 1
    for axis in data_axes:
        num_chunks *= mesh.shape[axis]
    batch_size = zimg.shape[0]
    if batch_size % num_chunks:
        raise ValueError(f"contrastive batch {batch_size} is not divisible by the {num_chunks} "
                         f"data-parallel shards of mesh axes {data_axes}")
    # Each device sends its current text chunk to the previous device of the ring, so after k
    # hops device i holds the texts of device (i + k) % n; k = 0 is the one holding positives.
    ring = [(i, (i - 1) % num_chunks) for i in range(num_chunks)]

    def per_device(img, txt, scale, bias):
        temperature = jnp.exp(scale.reshape(()).astype(jnp.float32))
        bias = bias.reshape(()).astype(jnp.float32)
        img = img.astype(jnp.float32)

        def hop(_, carry):
            total, txt_chunk = carry
            txt_chunk = jax.lax.ppermute(txt_chunk, data_axes, ring)
            return total + _pair_loss_sum(img, txt_chunk, temperature, bias, False), txt_chunk

        txt = txt.astype(jnp.float32)
        own = _pair_loss_sum(img, txt, temperature, bias, True)
        total, _ = jax.lax.fori_loop(1, num_chunks, hop, (own, txt))
        return jax.lax.psum(total, data_axes) / batch_size

    batch_spec = P(data_axes)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()),
                         out_specs=P())(zimg, ztxt, logit_scale, logit_bias)


def hard_negatives(zimg: jax.Array, ztxt: jax.Array, text_ids: jax.Array, logit_scale: jax.Array,
                   rng: jax.Array, mesh: Mesh, data_axes: Sequence[str] = ("data", "fsdp")):
    """BLIP's hard negatives within the global batch.

    zimg, ztxt: L2-normalised f32[B, P] (B split over `data_axes`), text_ids i32[B, L] (two
    captions with the same ids describe the same thing: never a negative of each other),
    logit_scale f32[1] (SigLIP's log temperature). For image i, a caption j is drawn with
    probability softmax_j(t * x_i . y_j) over the captions that differ from caption i; for
    caption i an image likewise. Returns (text_for_image, image_for_text) i32[B] (global
    indices) and (text_ok, image_ok) bool[B] (False: every caption of the batch is the same).
    Each device holds [B/n, B] similarities, never B x B."""
    data_axes = tuple(a for a in data_axes if mesh.shape[a] > 1) or tuple(data_axes[:1])

    def per_device(img, txt, ids, scale, key):
        gather = functools.partial(jax.lax.all_gather, axis_name=data_axes, tiled=True)
        all_img, all_txt, all_ids = gather(img), gather(txt), gather(ids)
        shard = jax.lax.axis_index(data_axes)
        temperature = jnp.exp(scale.reshape(()).astype(jnp.float32))
        same = jnp.all(ids[:, None, :] == all_ids[None, :, :], axis=-1)       # [b, B]
        # one key per global row: the same draws on any mesh
        rows = shard * img.shape[0] + jnp.arange(img.shape[0])
        keys = jax.vmap(lambda row: jax.random.split(jax.random.fold_in(key, row)))(rows)

        def draw(keys, queries, candidates):
            logits = temperature * (queries.astype(jnp.float32) @ candidates.astype(jnp.float32).T)
            logits = jnp.where(same, -jnp.inf, logits)
            return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

        ok = jnp.any(~same, axis=1)
        return draw(keys[:, 0], img, all_txt), draw(keys[:, 1], txt, all_img), ok, ok

    rows = P(data_axes)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows, P(), P()),
                         out_specs=(rows, rows, rows, rows))(zimg, ztxt, text_ids, logit_scale, rng)


def itm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean binary cross entropy, number correct) of matching logits f32[R] against labels
    {0, 1}[R], pairs weighted by `weights` f32[R] (0 = left out)."""
    labels = labels.astype(jnp.float32)
    per_pair = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = jnp.sum(weights * ((logits > 0) == (labels > 0.5)))
    return jnp.sum(weights * per_pair) / total, correct
