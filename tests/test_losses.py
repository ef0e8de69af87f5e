"""Losses against numpy: masked CE normalised per token over the global batch, and the ring-chunked
SigLIP sigmoid loss on the 8-device mesh against the full B x B matrix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.train import losses


def _numpy_ce(logits, targets, mask):
    logits = logits.astype(np.float64)
    log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_norm - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == targets
    return (nll * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum(), nll


def test_cross_entropy_masked_and_normalised_per_token_over_the_global_batch():
    rng = np.random.default_rng(0)
    b, t, v = 8, 6, 11
    logits = rng.standard_normal((b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, :1] = 1          # rows with very different token counts: a per-row mean would differ
    mask[1:, 2:] = 1
    want_loss, want_acc, nll = _numpy_ce(logits, targets, mask)
    per_row_mean = np.mean([(nll[i] * mask[i]).sum() / mask[i].sum() for i in range(b)])
    assert abs(per_row_mean - want_loss) > 1e-3  # the two normalisations really differ here

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))
    batch = sharding.global_batch(dict(logits=logits, targets=targets, mask=mask), mesh)
    loss, acc = jax.jit(losses.next_token_loss)(batch["logits"], batch["targets"], batch["mask"])
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(float(acc), want_acc, rtol=1e-6)

    # masked tokens contribute nothing, whatever their logits
    poisoned = np.where(mask[..., None] > 0, logits, 1e4).astype(np.float32)
    loss2, _ = jax.jit(losses.next_token_loss)(poisoned, targets, mask)
    np.testing.assert_allclose(float(loss2), want_loss, rtol=1e-6)

    sums = losses.next_token_sums(logits, targets, mask)
    assert float(sums[2]) == mask.sum()


def test_cross_entropy_of_bf16_logits_runs_in_f32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 5, 300)) * 4, jnp.bfloat16)
    targets = rng.integers(0, 300, (2, 5)).astype(np.int32)
    mask = np.ones((2, 5), np.float32)
    want, _, _ = _numpy_ce(np.asarray(logits.astype(jnp.float32)), targets, mask)
    got, _ = losses.next_token_loss(logits, targets, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def _numpy_sigmoid_loss(x, y, logit_scale, logit_bias):
    logits = x.astype(np.float64) @ y.T.astype(np.float64) * np.exp(logit_scale) + logit_bias
    z = 2 * np.eye(len(x)) - 1
    return np.sum(np.logaddexp(0.0, -z * logits)) / len(x)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
def test_chunked_sigmoid_loss_matches_full_matrix(mesh_shape):
    rng = np.random.default_rng(2)
    b, p = 16, 6
    x = rng.standard_normal((b, p)).astype(np.float32)
    y = x + 0.5 * rng.standard_normal((b, p)).astype(np.float32)  # positives are similar
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    scale, bias = np.array([np.log(10.0)], np.float32), np.array([-2.0], np.float32)
    want = _numpy_sigmoid_loss(x, y, scale[0], bias[0])

    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    batch = sharding.global_batch(dict(x=x, y=y), mesh)
    chunked = lambda x, y, s, c: losses.sigmoid_loss_chunked(x, y, s, c, mesh)  # noqa: E731
    got = jax.jit(chunked)(batch["x"], batch["y"], scale, bias)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)

    # gradients (image side, text side, temperature, bias) agree with the full-matrix loss
    grads = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(batch["x"], batch["y"], scale, bias)
    ref = jax.grad(losses.sigmoid_loss_reference, argnums=(0, 1, 2, 3))(x, y, scale, bias)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)

    # no device builds the B x B matrix: the only pair-logit blocks are [B/n, B/n]
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    text = str(jax.make_jaxpr(chunked)(batch["x"], batch["y"], scale, bias))
    assert f"f32[{b // n},{b // n}]" in text and f"f32[{b},{b}]" not in text


def test_chunked_sigmoid_loss_refuses_indivisible_batch():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="not divisible"):
        losses.sigmoid_loss_chunked(x, x, np.zeros(1, np.float32), np.zeros(1, np.float32), mesh)


@pytest.mark.parametrize("vocab_axis,chunk_size", [(0, 4), (1, 4), (0, 64)])
def test_fused_head_cross_entropy_matches_full_logits_on_a_sharded_mesh(vocab_axis, chunk_size):
    """Logits only at loss positions, chunked with a data-dependent trip count, gradients fused
    into the forward: equal to CE on the full logits (values and gradients of hidden and head),
    with rows of very different loss counts (one with none), fractional weights, ties in argmax,
    batch split over data x fsdp and the vocabulary over tensor."""
    rng = np.random.default_rng(1)
    b, t, d, v = 8, 21, 16, 24
    hidden = rng.standard_normal((b, t, d)).astype(np.float32)
    head = rng.standard_normal((v, d) if vocab_axis == 0 else (d, v)).astype(np.float32) * 0.5
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 3:20] = 1
    mask[1, [0, 7, 20]] = 1
    mask[2:6, 10:] = 0.5
    mask[6, :] = 1                          # row 7 has no loss token at all
    hidden[6, 4] = 0.0                       # all logits 0: argmax must pick index 0 like numpy
    targets[6, 4] = 0

    def full(hidden, head):
        logits = jnp.einsum("btd,vd->btv", hidden, head if vocab_axis == 0 else head.T)
        return losses.next_token_sums(logits, targets, mask)

    def fused(hidden, head):
        return losses.next_token_sums_from_hidden(hidden, head, vocab_axis, targets, mask,
                                                  chunk_size=chunk_size)  # 64: one chunk of 21

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    with sharding.rules_context(mesh):
        h = jax.device_put(hidden, sharding.batch_sharding(mesh, 3))
        want = jax.jit(full)(hidden, head)
        got = jax.jit(fused)(h, head)
        for w, g in zip(want, got):
            np.testing.assert_allclose(float(g), float(w), rtol=1e-6)
        want_grads = jax.jit(jax.grad(lambda *a: full(*a)[0], argnums=(0, 1)))(hidden, head)
        got_grads = jax.jit(jax.grad(lambda *a: 3.0 * fused(*a)[0], argnums=(0, 1)))(h, head)
    for w, g in zip(want_grads, got_grads):
        np.testing.assert_allclose(np.asarray(g), 3.0 * np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_fused_head_cross_entropy_with_soft_cap_matches_autodiff_reference(vocab_axis):
    """Why: with Gemma 2's final soft-cap the fused CE writes its gradient by hand through
    cap * tanh(z / cap) (the 1 - tanh^2 factor, on both the hidden and the head gradient).
    Loss, correct count and both gradients must equal plain jax autodiff of
    cap * tanh(hidden @ head^T / cap) -> masked cross entropy, with logits well past the cap
    (tanh saturated) and near zero, fractional weights, a row without loss tokens, chunks."""
    rng = np.random.default_rng(3)
    b, t, d, v, cap = 4, 11, 8, 19, 3.0
    hidden = rng.standard_normal((b, t, d)).astype(np.float32)
    hidden[0] *= 4.0                        # |logits| up to ~10 cap: saturated tanh
    hidden[1] *= 0.05                       # |logits| << cap: almost no capping
    head_vd = (rng.standard_normal((v, d)) * 0.7).astype(np.float32)
    head = head_vd if vocab_axis == 0 else np.ascontiguousarray(head_vd.T)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 1:] = 1
    mask[1, [2, 5, 9]] = 1
    mask[2, 4:] = 0.5                       # row 3 has no loss token at all

    def reference(hidden, head):
        w = head if vocab_axis == 0 else head.T
        logits = cap * jnp.tanh(jnp.einsum("btd,vd->btv", hidden, w) / cap)
        target = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        nll = jax.nn.logsumexp(logits, -1) - target
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)

    def fused(hidden, head):
        return losses.next_token_sums_from_hidden(hidden, head, vocab_axis, targets, mask,
                                                  chunk_size=4, soft_cap=cap)

    want, got = jax.jit(reference)(hidden, head), jax.jit(fused)(hidden, head)
    for w, g in zip(want, got):
        np.testing.assert_allclose(float(g), float(w), rtol=1e-5)
    without_cap = losses.next_token_sums_from_hidden(hidden, head, vocab_axis, targets, mask)[0]
    assert abs(float(without_cap) - float(want[0])) > 1.0   # the cap really matters here
    want_grads = jax.jit(jax.grad(lambda *a: reference(*a)[0], argnums=(0, 1)))(hidden, head)
    got_grads = jax.jit(jax.grad(lambda *a: 2.0 * fused(*a)[0], argnums=(0, 1)))(hidden, head)
    for name, w, g in zip(("hidden", "head"), want_grads, got_grads):
        np.testing.assert_allclose(np.asarray(g), 2.0 * np.asarray(w), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert np.abs(np.asarray(want_grads[0][3])).max() == 0.0   # no loss token, no gradient
