"""Mask builder and attention against numpy references."""
import pytest
import jax
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


# ----------------------------------------------------------------------------- sliding window

def _numpy_window_mask(mask_ar, segment_ids, positions, window):
    """numpy: the mask of `_numpy_mask`, limited to keys 0 <= q_pos - k_pos < window."""
    base = _numpy_mask(mask_ar, segment_ids)
    t = len(mask_ar)
    out = base.copy()
    for i in range(t):
        for j in range(t):
            out[i, j] = base[i, j] and 0 <= positions[i] - positions[j] < window
    return out


def test_sliding_window_mask_keeps_exactly_the_window_within_causal_packed_segments():
    """Why: Gemma 2 / 3's sliding layers must see exactly the keys HF's `kv_idx > q_idx -
    sliding_window` keeps (the query itself and window - 1 keys behind it), also with the
    window as a traced per-layer value (the scanned LayerSpec); window 0 (a full-attention
    layer of the same model) must leave the mask untouched; positions restart in each packed
    segment, so the window counts from the segment's start and never reaches across it."""
    seg = np.array([[1] * 9 + [2] * 5 + [0] * 2])          # two packed segments + padding
    positions = np.array([list(range(9)) + list(range(5)) + [0, 0]])
    mask_ar = np.ones_like(seg)
    causal = layers.make_attention_mask(jnp.asarray(mask_ar), jnp.asarray(seg))
    for window in (1, 3, 8):
        want = _numpy_window_mask(mask_ar[0], seg[0], positions[0], window)
        got = layers.sliding_window_mask(causal, jnp.asarray(positions), jnp.asarray(positions),
                                         np.int32(window))
        np.testing.assert_array_equal(np.asarray(got)[0, 0], want, err_msg=f"window {window}")
        traced = jax.jit(layers.sliding_window_mask)(causal, positions, positions,
                                                     jnp.int32(window))
        np.testing.assert_array_equal(np.asarray(traced)[0, 0], want, err_msg=f"traced {window}")
        assert np.asarray(got)[0, 0].sum(-1).max() == min(window, 9)
    got = np.asarray(layers.sliding_window_mask(causal, jnp.asarray(positions),
                                                jnp.asarray(positions), np.int32(3)))[0, 0]
    assert got[8, 6] and not got[8, 5]                      # 8 - 6 = 2 < 3 <= 8 - 5
    assert got[11, 9] and got[11, 11] and not got[11, :9].any()   # segment 2 starts again
    assert not got[9:, :9].any() and not got[:9, 9:].any() and not got[:, 14:].any()
    # window 0: unchanged (a static zero returns the very mask; a traced zero the same values)
    assert layers.sliding_window_mask(causal, positions, positions, np.int32(0)) is causal
    traced = jax.jit(layers.sliding_window_mask)(causal, positions, positions, jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(causal))


def test_sliding_window_mask_for_one_decode_query_against_cache_slots():
    """Why: a decode step has one query per row at position index[b] and keys that are cache
    slots 0 .. S-1 (key positions [1, S]); rows at different positions keep different slots."""
    slots = 12
    index = np.array([3, 10])
    visible = np.arange(slots)[None, :] <= index[:, None]
    mask = jnp.asarray(visible[:, None, None, :])
    got = np.asarray(layers.sliding_window_mask(mask, jnp.asarray(index[:, None]),
                                                jnp.arange(slots)[None, :], np.int32(4)))
    want = (np.arange(slots)[None, :] <= index[:, None]) & (index[:, None] - np.arange(slots) < 4)
    np.testing.assert_array_equal(got[:, 0, 0], want)
    assert got[0, 0, 0].tolist() == [True] * 4 + [False] * 8
    assert np.flatnonzero(got[1, 0, 0]).tolist() == [7, 8, 9, 10]


def test_tpu_flash_backend_with_a_sliding_window_is_refused_naming_attention_backend():
    """Why: the TPU flash kernel takes causal segments only; a sliding-window model on it would
    silently attend over the whole context. The config refuses it up front, naming the field,
    and the mask path refuses a SegmentMask (what that backend builds) as well."""
    import pytest

    from vlm_jax.errors import ConfigError
    from vlm_jax.models.decoder import DecoderConfig

    for family in ("gemma2", "gemma3"):
        with pytest.raises(ConfigError, match="attention_backend"):
            DecoderConfig(family=family, attention_backend="tpu_flash")
        DecoderConfig(family=family, attention_backend="xla")   # the dense path is fine
    seg = jnp.ones((1, 6), jnp.int32)
    mask = layers.attention_mask_for("tpu_flash", jnp.ones((1, 6), jnp.int32), seg)
    assert isinstance(mask, layers.SegmentMask)
    positions = jnp.arange(6)[None]
    with pytest.raises(ConfigError, match="attention_backend"):
        layers.sliding_window_mask(mask, positions, positions, np.int32(4))


def test_soft_cap_bounds_values_and_is_identity_near_zero():
    """Why: Gemma 2's cap * tanh(x / cap) must keep every logit inside (-cap, cap), keep the
    order (greedy decoding's argmax), be ~x for |x| << cap, and do nothing for cap 0 / None."""
    x = jnp.asarray(np.concatenate([np.linspace(-1e4, 1e4, 101), [-1e-3, 0.0, 1e-3]]), jnp.float32)
    capped = np.asarray(layers.soft_cap(x, 5.0))
    assert np.all(np.abs(capped) <= 5.0)
    assert np.all(np.diff(capped[:101]) >= 0)
    np.testing.assert_allclose(capped[-3:], [-1e-3, 0.0, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layers.soft_cap(jnp.asarray([2.0]), 50.0)),
                               [50.0 * np.tanh(2.0 / 50.0)], rtol=1e-6)
    assert layers.soft_cap(x, 0.0) is x and layers.soft_cap(x, None) is x


def _saved_residual_elements(policy: str) -> int:
    """Elements the backward pass of a tiny scanned decoder keeps, as jax reports them
    (`jax.ad_checkpoint.print_saved_residuals`, the public form of the residual list)."""
    import contextlib
    import io
    import re

    import flax.linen as nn

    from vlm_jax.models.decoder import Decoder, decoder_config
    cfg = decoder_config("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=48, remat_policy=policy)
    mask = layers.make_attention_mask(jnp.ones((1, 16), jnp.int32))
    x, pos = jnp.ones((1, 16, 32)), jnp.broadcast_to(jnp.arange(16), (1, 16))
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), x, pos, mask))["params"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: Decoder(cfg).apply({"params": p}, x, pos, mask).sum(), params)
    shapes = re.findall(r"\b(?:f32|i32|bool)\[([\d,]*)\]", printed.getvalue())
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)


def test_remat_policies_keep_different_residuals():
    """Why / `dots_no_batch` was byte for byte `full`: Dense's custom VJP hid its matmul from
    jax's checkpoint_dots* policies. Its output is now named, so each policy keeps what it says:
    none > dots (every matmul) > dots_no_batch (weight matmuls, attention recomputed) > full
    (block inputs only); dots_saveable is dots under jax's name."""
    kept = {p: _saved_residual_elements(p) for p in ("none", "dots", "dots_saveable",
                                                     "dots_no_batch", "full")}
    assert kept["none"] > kept["dots"] > kept["dots_no_batch"] > kept["full"], kept
    assert kept["dots_saveable"] == kept["dots"]


@pytest.mark.parametrize("x_shape,num_in,kernel_shape", [
    ((2, 5, 3), 1, (3, 7)),          # widening: the kernel gradient is written as [in, out]
    ((2, 5, 7), 1, (7, 3)),          # narrowing: computed as [out, in], then transposed
    ((2, 5, 4, 3), 2, (4, 3, 5)),    # two contracted dims (attention o: [heads, head_dim, embed])
    ((6, 4), 1, (4, 2, 3)),          # two output dims (attention q: [embed, heads, head_dim])
])
def test_dense_matmul_gradients_equal_the_plain_contraction(x_shape, num_in, kernel_shape):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    weights = jax.random.normal(jax.random.key(2), x_shape[:x.ndim - num_in] + kernel_shape[num_in:])
    dims = ((tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in))), ((), ()))

    def loss(fn):
        return lambda x, k: jnp.sum(jnp.tanh(fn(x, k)) * weights)

    ours = jax.grad(loss(lambda x, k: layers.dense_matmul(x, k, num_in)), argnums=(0, 1))(x, kernel)
    plain = jax.grad(loss(lambda x, k: jax.lax.dot_general(x, k, dims)), argnums=(0, 1))(x, kernel)
    for got, want in zip(ours, plain):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
