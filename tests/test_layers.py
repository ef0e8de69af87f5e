"""Mask builder and attention against numpy references."""
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers


def _numpy_mask(mask_ar, segment_ids):
    t = len(mask_ar)
    block = np.cumsum(mask_ar)
    out = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            out[i, j] = (block[j] <= block[i] and segment_ids[i] == segment_ids[j]
                         and segment_ids[j] != 0)
    return out


def test_mask_causal_prefix_and_segments():
    mask_ar = np.array([[0, 0, 0, 1, 1, 1, 0, 1, 1, 1]])
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    got = np.asarray(layers.make_attention_mask(jnp.asarray(mask_ar), jnp.asarray(seg)))[0, 0]
    np.testing.assert_array_equal(got, _numpy_mask(mask_ar[0], seg[0]))
    # prefix tokens (first three) attend to each other bidirectionally
    assert got[0, 2] and got[2, 0]
    # no attention across packed segments, and padding keys are never seen
    assert not got[5, 4] and not got[4, 5] and not got[:, 8:].any()


def test_attention_gqa_matches_numpy():
    rng = np.random.default_rng(0)
    b, t, h, k, d = 2, 5, 4, 2, 8
    q, kk, v = (rng.standard_normal(s).astype(np.float32) for s in [(b, t, h, d), (b, t, k, d), (b, t, k, d)])
    mask = np.asarray(layers.make_attention_mask(jnp.ones((b, t), jnp.int32)))
    got = np.asarray(layers.dot_product_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                                                  jnp.asarray(mask)))
    kr, vr = np.repeat(kk, h // k, axis=2), np.repeat(v, h // k, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(d)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, vr)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tpu_flash_backend_matches_dense_path_in_interpret_mode():
    """The Pallas TPU kernel (run by the Pallas interpreter on CPU) == the XLA path, for causal
    packed masks with GQA and for the bidirectional (no mask) case, values and gradients."""
    import jax
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(0)
    b, t, h, k, d = 2, 128, 4, 2, 32
    q, kk, v = (jnp.asarray(rng.standard_normal(s).astype(np.float32))
                for s in [(b, t, h, d), (b, t, k, d), (b, t, k, d)])
    seg = np.ones((b, t), np.int32)
    seg[0, 70:] = 2
    seg[1, 100:] = 0  # padding
    seg = jnp.asarray(seg)
    mask_ar = jnp.ones((b, t), jnp.int32)
    real = np.asarray(seg) > 0

    def run(backend, q):
        mask = layers.attention_mask_for(backend, mask_ar, seg)
        return layers.dot_product_attention(q, kk, v, mask, backend=backend)

    with pltpu.force_tpu_interpret_mode():
        flash = run("tpu_flash", q)
        flash_grad = jax.grad(lambda q: (run("tpu_flash", q) * real[..., None, None]).sum())(q)
        flash_full = layers.dot_product_attention(q, q, q, None, backend="tpu_flash")
    dense = run("xla", q)
    dense_grad = jax.grad(lambda q: (run("xla", q) * real[..., None, None]).sum())(q)
    np.testing.assert_allclose(np.asarray(flash)[real], np.asarray(dense)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(flash_grad)[real], np.asarray(dense_grad)[real], atol=1e-4)
    np.testing.assert_allclose(np.asarray(flash_full),
                               np.asarray(layers.dot_product_attention(q, q, q, None)), atol=1e-5)
