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
