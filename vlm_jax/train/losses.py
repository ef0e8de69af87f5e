"""Losses: masked next-token cross entropy (per token over the global batch) and SigLIP's sigmoid loss.

Cross entropy is returned as SUMS (masked loss sum, correct-token count, token count) so the
caller normalises once by the token count of the whole global batch: with gradient accumulation
every micro-batch divides by the same total, and the result equals one big batch. Under `jit` on
a mesh, `jnp.sum` over a batch-sharded array is a global reduction, so every device agrees.

The sigmoid loss is computed chunked (big_vision's "chunked" SigLIP): inside `jax.shard_map` each
device keeps its image-embedding shard and passes the text shards around the ring with
`ppermute`, so no device ever holds the full B x B logits.
"""
from __future__ import annotations

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
