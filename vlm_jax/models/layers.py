"""Shared building blocks: sharded parameters, dense/norm layers, RoPE, attention masks and attention.

Every parameter is created with logical axis names (see `vlm_jax/sharding.py` for the rule
table that maps them onto mesh axes). Logical names used across the models:

    embed      model width (d_model) of whichever tower the parameter lives in
    mlp        MLP hidden width
    heads      query heads            kv_heads   key/value heads (GQA / MQA)
    head_dim   per-head width         vocab      vocabulary
    layers     the stacked-layer axis that nn.scan adds
    patch      flattened patch pixels (conv patch embedding input)
    pos        position-embedding table rows
    norm       1-D norm scales / biases (never sharded)

Activations at block boundaries are constrained to ('batch', 'length', 'act_embed').
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.errors import ConfigError

Dtype = Any
Initializer = Callable[..., jax.Array]

# Finite "minus infinity": a fully masked row (padding) softmaxes to uniform instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

ACTIVATION_AXES = ("batch", "length", "act_embed")


def constrain(x: jax.Array, axes: Sequence[str | None] = ACTIVATION_AXES) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh / rule context)."""
    return nn.with_logical_constraint(x, tuple(axes))


def sharded_param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                  axes: Sequence[str | None], dtype: Dtype) -> jax.Array:
    """`module.param` whose value carries logical axis names (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"param {name}: {len(axes)} axis names {axes} for shape {shape}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
    """x [*batch, *in] @ kernel [*in, *out] -> [*batch, *out] (`num_in` contracted dims).

    The custom VJP only changes how the kernel gradient is written. It contracts the batch dims
    of x and grad_y, and XLA:CPU's matmul reads one of the two transposed: it folds that
    transpose into the operand's producer (the SiLU backward, the remat'd gate * up), whose
    strided writes can cost as much as the matmul itself. So the operand with fewer features is
    the one read transposed: for a layer that widens (in <= out) the output is written directly
    as [*in, *out]; for one that narrows (the MLP's down projection, k / v) it is computed as
    [*out, *in] and the kernel-sized result is transposed (bench_s step: -0.3 s of 5.7).
    """
    return jax.lax.dot_general(x, kernel, _dense_dims(x.ndim, num_in))


def _dense_dims(x_ndim: int, num_in: int):
    return (tuple(range(x_ndim - num_in, x_ndim)), tuple(range(num_in))), ((), ())


def _dense_matmul_fwd(x, kernel, num_in):
    return dense_matmul(x, kernel, num_in), (x, kernel)


def _dense_matmul_bwd(num_in, residuals, grad_y):
    x, kernel = residuals
    batch_dims = x.ndim - num_in
    # dx [*batch, *in] = grad_y [*batch, *out] . kernel [*in, *out] over *out
    grad_x = jax.lax.dot_general(
        grad_y, kernel, ((tuple(range(batch_dims, grad_y.ndim)),
                          tuple(range(num_in, kernel.ndim))), ((), ())))
    # dkernel [*in, *out] = x [*batch, *in] . grad_y [*batch, *out] over *batch
    over_batch = ((tuple(range(batch_dims)), tuple(range(batch_dims))), ((), ()))
    if math.prod(x.shape[batch_dims:]) <= math.prod(grad_y.shape[batch_dims:]):
        grad_kernel = jax.lax.dot_general(x, grad_y, over_batch)
    else:
        num_out = grad_y.ndim - batch_dims
        grad_kernel = jnp.transpose(jax.lax.dot_general(grad_y, x, over_batch),
                                    tuple(range(num_out, num_out + num_in)) + tuple(range(num_out)))
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


class Dense(nn.Module):
    """y = x @ W (+ b) contracting the last `len(in_shape)` input dims into `out_shape`.

    The kernel is stored as f32[*in_shape, *out_shape] (e.g. attention q: [embed, heads, head_dim]),
    which is the layout `convert/` reshapes HF's [out, in] Linear weights into.
    """
    in_shape: Sequence[int]
    out_shape: Sequence[int]
    kernel_axes: Sequence[str | None]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        shape = tuple(self.in_shape) + tuple(self.out_shape)
        init = self.kernel_init
        if n_in > 1 or n_out > 1:
            # lecun_normal needs to know which dims are fan-in for a multi-dim kernel.
            init = nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal",
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = sharded_param(self, "kernel", init, shape, self.kernel_axes, self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        # Named for the remat policies: the custom VJP hides the dot from checkpoint_dots*.
        y = checkpoint_name(dense_matmul(x, kernel, n_in), DENSE_OUTPUT)
        if self.use_bias:
            bias_axes = tuple(self.kernel_axes)[n_in:]
            bias = sharded_param(self, "bias", nn.initializers.zeros, self.out_shape, bias_axes,
                                 self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm with f32 statistics and logically-named scale/bias."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = sharded_param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        bias = sharded_param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm. `plus_one=True` is Gemma's form: the weight is stored as w and applied as (1 + w)."""
    eps: float = 1e-6
    plus_one: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = sharded_param(self, "scale", init, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        w = scale.astype(jnp.float32)
        if self.plus_one:
            w = 1.0 + w
        return (y * w).astype(self.dtype)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies f32[head_dim // 2]; `scaling` = a Llama-3 or linear rope_scaling dict,
    or None."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":  # positions divided by the factor (Gemma 3's global layers)
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind != "llama3":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: 'llama3', "
                          f"'linear' or none)")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF "rotate_half" convention. x: [B, T, H, hd]; positions: i32[B, T].
    All-zero `inv_freq` leaves x as it is (a layer without RoPE)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- masks

def make_attention_mask(mask_ar: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool[B, 1, T, T] "query i may attend key j" from the big_vision `mask_ar` vector.

    mask_ar: i32[B, T]. A token with mask_ar=0 joins the block of the token before it, a token
    with mask_ar=1 starts a new block; a query sees every key whose block is not after its own.
      all ones                 -> causal (LLaVA)
      zeros on image + prompt,
      ones on the answer       -> prefix-LM (PaliGemma): the prefix attends bidirectionally
    segment_ids: i32[B, T] for packed rows; tokens only see keys of their own segment, and
    segment 0 is padding (sees nothing, is seen by nothing).
    """
    block = jnp.cumsum(mask_ar, axis=-1)
    mask = block[:, None, :] <= block[:, :, None]  # [B, Tq, Tk]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same & (segment_ids[:, None, :] != 0)
    return mask[:, None, :, :]


def sliding_window_mask(mask: jax.Array, query_positions: jax.Array, key_positions: jax.Array,
                        window) -> jax.Array:
    """`mask` bool[B, 1, T, S] further limited to keys less than `window` positions behind the
    query (HF's `kv_idx > q_idx - sliding_window`); window 0 leaves it as it is (a full-attention
    layer of a model whose other layers slide). Positions restart in every packed segment, so the
    window never reaches across one. query_positions i32[B, T], key_positions i32[B|1, S].

    A bidirectional block (a prefix-LM's image + prompt, mask_ar zeros) is never cut: pairs of
    one block (the symmetric part of a square mask) stay visible at any distance, as in HF's
    PaliGemma 2 / Gemma 3, whose sliding masks are (causal & window) | same block. A causal
    mask's symmetric part is its diagonal, which the window keeps anyway."""
    if isinstance(mask, SegmentMask):
        raise ConfigError("attention_backend='tpu_flash' cannot apply a sliding window")
    if isinstance(window, (int, np.integer)) and window == 0:
        return mask
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
    inside = distance < window
    if mask.shape[-1] == mask.shape[-2]:  # T queries over their own T keys (not a cache step)
        inside = inside | (mask & jnp.swapaxes(mask, -1, -2))
    return mask & (inside | (window == 0))


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma 2's soft-capping); no cap when `cap` is 0 or None."""
    if not cap:
        return logits
    return cap * jnp.tanh(logits / cap)


@flax.struct.dataclass
class SegmentMask:
    """A causal mask within packed segments, kept as its segment ids (i32[B, T], 0 = padding)
    instead of a dense [B, 1, T, T] array: what the TPU flash kernel takes. Only causal masks
    have this form; prefix-LM masks (mask_ar zeros) need the dense path."""
    segment_ids: jax.Array


def attention_mask_for(backend: str, mask_ar: jax.Array,
                       segment_ids: jax.Array | None) -> jax.Array | SegmentMask:
    """The mask in the form `backend` consumes (dense for every backend but 'tpu_flash').

    With 'tpu_flash' the mask is taken to be causal (mask_ar all ones), which the config
    validation enforces by refusing prefix-LM data with that backend."""
    if resolve_attention_backend(backend) == "tpu_flash":
        if segment_ids is None:
            segment_ids = jnp.ones(mask_ar.shape, jnp.int32)
        return SegmentMask(segment_ids.astype(jnp.int32))
    return make_attention_mask(mask_ar, segment_ids)


# ----------------------------------------------------------------------------- attention

# tpu_flash: the Pallas TPU flash-attention kernel (causal + packed segments; explicit opt-in
# since it cannot express prefix-LM masks). On CPU it runs only in Pallas interpret mode (tests).
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "jax_dpa", "tpu_flash")


def resolve_attention_backend(backend: str) -> str:
    """'auto' -> cuDNN fused attention on GPU, plain XLA einsum-softmax elsewhere."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={backend!r}; supported: {ATTENTION_BACKENDS}")
    if backend == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return backend


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          backend: str = "xla", scale: float | None = None,
                          logits_soft_cap: float | None = None,
                          kv_heads_first: bool = False) -> jax.Array:
    """Multi-head attention with GQA/MQA. q: [B, T, H, hd]; k, v: [B, S, K, hd] with H % K == 0
    ([B, K, S, hd] with `kv_heads_first`: a KV cache's layout).

    mask: bool[B, 1, T, S] (True = attend) or None. Returns [B, T, H, hd] in q's dtype.
    Softmax statistics are computed in f32 whatever the compute dtype.
    """
    backend = resolve_attention_backend(backend)
    b, t, h, hd = q.shape
    kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    if h % kv_heads:
        raise ConfigError(f"{h} query heads is not a multiple of {kv_heads} kv heads")
    scale = hd ** -0.5 if scale is None else scale
    if isinstance(mask, SegmentMask) or backend == "tpu_flash":
        if not (mask is None or isinstance(mask, SegmentMask)) or logits_soft_cap is not None:
            raise ConfigError("attention_backend='tpu_flash' takes a SegmentMask (causal packed "
                              "attention, see attention_mask_for) or no mask (bidirectional), "
                              "and no logit soft-capping")
        if kv_heads_first:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return _tpu_flash_attention(q, k, v, None if mask is None else mask.segment_ids, scale)
    if backend == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        backend = "xla"  # cuDNN's fused kernel takes fp16/bf16 only; f32 runs the XLA path
    if backend in ("cudnn", "jax_dpa") and logits_soft_cap is None:
        impl = "cudnn" if backend == "cudnn" else "xla"
        if kv_heads_first:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
    groups = h // kv_heads
    if kv_heads_first:
        # A KV cache [B, K, S, hd]: the query heads as [B, K, G, T, hd] too, so that the batch
        # dims (B, K) lead in every operand and XLA:CPU's batched matmul reads the cache in place
        # (with T second, each decode step copied the cache: 30% slower).
        q_spec, kv, out_spec = "bkgtd", "bksd", "bkgtd"
        qg = q.reshape(b, t, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    else:
        q_spec, kv, out_spec = "btkgd", "bskd", "btkgd"
        qg = q.reshape(b, t, kv_heads, groups, hd)
    logits = jnp.einsum(f"{q_spec},{kv}->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    logits = soft_cap(logits, logits_soft_cap)
    if mask is not None:
        # An additive bias rather than a select: the select's backward materialises a zeros
        # tensor of the logits' size per layer; adding a constant passes the gradient as is.
        # |logits| << |MASK_VALUE| rounds masked entries to exactly MASK_VALUE, as a select would.
        bias = jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)
        logits = logits + bias[:, :, None]  # bias: [B, 1, 1, T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->{out_spec}", probs, v).astype(q.dtype)
    if kv_heads_first:
        out = out.transpose(0, 3, 1, 2, 4)  # [B, T, K, G, hd]
    return out.reshape(b, t, h, hd)


def _tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                         scale: float) -> jax.Array:
    """Pallas TPU flash attention: causal within segments, or bidirectional over everything when
    `segment_ids` is None (the SigLIP towers). q [B, T, H, hd], k/v [B, S, K, hd]."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # the kernel has no GQA: share each kv head across its query group
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, H, T, hd]
    out = tpu_flash.flash_attention(
        heads_first(q), heads_first(k), heads_first(v),
        segment_ids=None if segment_ids is None else tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids),
        causal=segment_ids is not None, sm_scale=scale)
    return heads_first(out)


# ----------------------------------------------------------------------------- remat / scan

DENSE_OUTPUT = "dense_output"  # checkpoint_name of every Dense layer's matmul output
_SAVE_DENSE = jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)
_DOTS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots, _SAVE_DENSE)
# What the backward pass keeps of each block's forward (the rest is recomputed):
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    # every matmul output: the projections (Dense, named: its custom VJP hides the dot from
    # checkpoint_dots) and the attention scores / outputs; "dots_saveable" is jax's name for it
    "dots": _DOTS,
    "dots_saveable": _DOTS,
    # the weight matmuls only (no batch dims): projections and MLPs saved, attention recomputed
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _SAVE_DENSE),
}


def stack_layers(block_cls: type[nn.Module], num_layers: int, remat_policy: str,
                 in_axes: Any = nn.broadcast, unroll: int = 1) -> type[nn.Module]:
    """`nn.scan` over `num_layers` copies of `block_cls` (params get a leading 'layers' axis),
    each wrapped in `nn.remat` with the named policy. The block's signature must be
    `(carry, *broadcast_args) -> (carry, None)`.

    unroll: layers per loop iteration (a tower's `scan_unroll`); `num_layers` or more is
    straight-line code. The params keep their stacked layout either way; what changes is the
    program: a rolled loop compiles once per block, while unrolled, XLA schedules and fuses
    across layers and drops the loop's per-iteration slicing and stacking. A few-layer model on
    CPU trains ~10% faster unrolled (the shapes recipe); deep models keep 1 for compile time."""
    if remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"remat_policy={remat_policy!r}; supported: {tuple(REMAT_POLICIES)}")
    if unroll < 1:
        raise ConfigError(f"scan_unroll={unroll} must be >= 1 (layers per loop iteration)")
    cls = block_cls
    if remat_policy != "none":
        cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=num_layers, unroll=min(unroll, num_layers),
                   metadata_params={nn.PARTITION_NAME: "layers"})
