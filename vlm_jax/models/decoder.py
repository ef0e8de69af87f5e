"""The decoder LLM: one pre-norm RoPE transformer; which family it is (Llama, Qwen2/3, Gemma 1/2/3,
SmolLM3) is `DecoderConfig.family`, whose module in `models/families/` sets the switches below.

    qkv_bias         biases on q/k/v (Qwen2)
    qk_norm          RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    mlp_act          SwiGLU ("silu") or tanh-GeGLU ("gelu_tanh", Gemma)
    norm_plus_one    RMSNorm weight stored as w, applied as (1 + w) (Gemma)
    embed_scale      token embeddings * sqrt(hidden_size) (Gemma)
    post_norms       a norm after attention and after the MLP too (Gemma 2 / 3)
    *_logit_softcap  cap * tanh(x / cap) on attention / final logits, 0 = none (Gemma 2)
    query_pre_attn_scalar   attention scale = this ** -0.5 (None: head_dim)
    layer_types, sliding_window   per-layer full or sliding-window attention (Gemma 2 / 3)
    rope_local_theta RoPE base of the sliding layers, unscaled (Gemma 3; 0 = rope_theta)
    nope_layers      layers without RoPE (SmolLM3)

Param tree (below the module's own name; blocks are scanned, so every `layers/...` param has a
leading [num_layers] axis named 'layers'):

    embed/embedding                    [V, D]        ('vocab', 'embed')
    layers/pre_attention_norm/scale    [D]
    layers/attention/{q}/kernel        [D, H, hd]    ('embed', 'heads', 'head_dim')
    layers/attention/{k,v}/kernel      [D, K, hd]    ('embed', 'kv_heads', 'head_dim')
    layers/attention/{q,k,v}/bias      [H|K, hd]     (qkv_bias only)
    layers/attention/{q,k}_norm/scale  [hd]          (qk_norm only)
    layers/attention/o/kernel          [H, hd, D]    ('heads', 'head_dim', 'embed')
    layers/post_attention_norm/scale   [D]           (post_norms only)
    layers/pre_mlp_norm/scale          [D]
    layers/mlp/{gate,up}/kernel        [D, F]        ('embed', 'mlp')
    layers/mlp/down/kernel             [F, D]        ('mlp', 'embed')
    layers/post_mlp_norm/scale         [D]           (post_norms only)
    final_norm/scale                   [D]
    lm_head/kernel                     [D, V]        ('embed', 'vocab')   untied only

What differs from layer to layer (RoPE frequencies, the sliding window) is data, not params: a
`LayerSpec` per layer, stacked and scanned with the blocks. Training, prefill and KV-cache decoding
run the same `DecoderBlock` / `Attention` code; generation passes a `KVCache`.

Gemma's sqrt(hidden_size) embedding scale is applied in `Decoder.embed`, to token embeddings
only, as transformers 5.x (`GemmaTextScaledWordEmbedding`) and big_vision do: image features
spliced into the sequence afterwards are not scaled.
"""
from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import from_dict
from vlm_jax.errors import ConfigError
from vlm_jax.models import families, layers
from vlm_jax.models.families.base import LAYER_TYPES, SLIDING, STRUCTURAL

FAMILIES = families.NAMES
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder; every field is a scalar or a tuple, so it is hashable.

    Fields left None take the family's value (`models/families/<family>.py`); a value that
    contradicts a field the family fixes is a ConfigError naming both."""
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1408
    norm_eps: float | None = None
    rope_theta: float | None = None
    # RoPE scaling of the full-attention layers: "llama3" (all four fields) or "linear" (factor).
    rope_scaling_type: str | None = None
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    qkv_bias: bool | None = None
    mlp_act: str | None = None
    norm_plus_one: bool | None = None
    embed_scale: bool | None = None
    tie_embeddings: bool | None = None
    qk_norm: bool | None = None
    post_norms: bool | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    nope_layers: tuple[int, ...] | None = None
    max_position_embeddings: int = 4096
    # compute fields
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"
    remat_policy: str = "none"
    scan_unroll: int = 1  # layers per loop iteration (layers.stack_layers)

    def __post_init__(self):
        def check(ok: bool, field: str, supported: str):
            if not ok:
                raise ConfigError(f"DecoderConfig.{field}={getattr(self, field)!r}; supported: {supported}")

        def resolve(field: str, value):
            object.__setattr__(self, field, value)

        family = families.get(self.family)
        for field in STRUCTURAL:
            value, default = getattr(self, field), family.defaults[field]
            if value is None:
                resolve(field, default)
            elif field not in family.free and value != default:
                raise ConfigError(
                    f"DecoderConfig.{field}={value!r} contradicts family={self.family!r}, which "
                    f"fixes {field}={default!r} (leave {field} unset, or choose another family)")
        if self.rope_scaling_type is None and self.rope_scaling_factor is not None:
            resolve("rope_scaling_type", "llama3")  # directories written before "linear" existed
        if self.query_pre_attn_scalar is None:
            resolve("query_pre_attn_scalar", float(self.head_dim))
        if self.layer_types is None:
            resolve("layer_types", family.layer_types(self.num_layers) if self.sliding_window
                    else (LAYER_TYPES[0],) * self.num_layers)
        if self.nope_layers is None:
            resolve("nope_layers", family.nope_layers(self.num_layers) if family.nope_layers else ())
        resolve("layer_types", tuple(self.layer_types))
        resolve("nope_layers", tuple(int(i) for i in self.nope_layers))

        check(self.mlp_act in MLP_ACTIVATIONS, "mlp_act", str(MLP_ACTIVATIONS))
        check(self.dtype in DTYPES, "dtype", str(DTYPES))
        check(self.param_dtype in DTYPES, "param_dtype", str(DTYPES))
        check(self.attention_backend in layers.ATTENTION_BACKENDS, "attention_backend",
              str(layers.ATTENTION_BACKENDS))
        check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy", str(tuple(layers.REMAT_POLICIES)))
        check(isinstance(self.scan_unroll, int) and self.scan_unroll >= 1, "scan_unroll",
              "an integer >= 1 (layers per loop iteration)")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            check(getattr(self, field) > 0, field, "a positive integer")
        check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "a positive even integer (RoPE)")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
              f"a divisor of num_heads={self.num_heads}")
        for field in ("attn_logit_softcap", "final_logit_softcap", "rope_local_theta", "sliding_window"):
            check(getattr(self, field) >= 0, field, "a number >= 0 (0 = none)")
        check(self.query_pre_attn_scalar > 0, "query_pre_attn_scalar", "a positive number")
        check(set(self.layer_types) <= set(LAYER_TYPES), "layer_types", f"entries of {LAYER_TYPES}")
        check(len(self.layer_types) == self.num_layers, "layer_types",
              f"one entry per layer: {len(self.layer_types)} given for num_layers={self.num_layers} "
              f"(leave layer_types unset, None, for the family's pattern)")
        check(self.sliding_window > 0 or SLIDING not in self.layer_types, "layer_types",
              "full_attention only while sliding_window=0")
        check(not self.nope_layers or family.nope_layers is not None, "nope_layers",
              f"() for family={self.family!r} (layers without RoPE: family smollm3)")
        check(all(0 <= i < self.num_layers for i in self.nope_layers), "nope_layers",
              f"layer indices in [0, {self.num_layers})")
        if self.attention_backend == "tpu_flash":  # the kernel takes causal segments only
            for unsupported, what in ((self.has_sliding_layers,
                                       f"sliding-window layers (sliding_window={self.sliding_window})"),
                                      (self.attn_logit_softcap, f"attn_logit_softcap={self.attn_logit_softcap}")):
                check(not unsupported, "attention_backend", f"not 'tpu_flash' with {what}: use 'xla' or 'auto'")
        check(self.rope_scaling_type in (None,) + ROPE_SCALING_TYPES, "rope_scaling_type",
              str((None,) + ROPE_SCALING_TYPES))
        llama3 = (self.rope_low_freq_factor, self.rope_high_freq_factor,
                  self.rope_original_max_position_embeddings)
        if self.rope_scaling_type == "llama3":
            check(self.rope_scaling_factor is not None and all(v is not None for v in llama3),
                  "rope_scaling_factor", "the four rope_* scaling fields all set (Llama-3 scaling)")
        else:
            check(all(v is None for v in llama3), "rope_low_freq_factor",
                  "None unless rope_scaling_type='llama3'")
            check((self.rope_scaling_factor is None) == (self.rope_scaling_type is None),
                  "rope_scaling_factor", "set exactly when rope_scaling_type is")

    @property
    def rope_scaling(self) -> dict | None:
        """The scaling dict that `layers.rope_inv_freq` takes, or None."""
        if self.rope_scaling_type is None:
            return None
        if self.rope_scaling_type == "linear":
            return {"rope_type": "linear", "factor": self.rope_scaling_factor}
        return {"rope_type": "llama3", "factor": self.rope_scaling_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings}

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types


def decoder_config(family: str, **fields) -> DecoderConfig:
    """A DecoderConfig of `family` (its structural values) with `fields` set."""
    return from_dict(DecoderConfig, {"family": family, **fields}, where="decoder")


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


@flax.struct.dataclass
class LayerSpec:
    """What differs between layers beyond their params: RoPE inverse frequencies f32[hd / 2]
    (zeros: no RoPE, a NoPE layer) and the sliding window (0 = full attention; None when no
    layer of the model slides). Stacked [L, ...] for the scanned stack."""
    inv_freq: jax.Array
    window: jax.Array | None = None


def layer_specs(cfg: DecoderConfig) -> list[LayerSpec]:
    """One LayerSpec per layer (numpy values) from the config."""
    full = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    local = full
    if cfg.rope_local_theta:
        local = layers.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, None)
    specs = []
    for i, kind in enumerate(cfg.layer_types):
        inv_freq = local if kind == SLIDING else full
        if i in cfg.nope_layers:
            inv_freq = np.zeros_like(inv_freq)
        window = None
        if cfg.has_sliding_layers:
            window = np.int32(cfg.sliding_window if kind == SLIDING else 0)
        specs.append(LayerSpec(inv_freq, window))
    return specs


def stacked_layer_specs(cfg: DecoderConfig) -> LayerSpec:
    """The layer specs stacked along a leading [num_layers] axis (what the scan consumes)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layer_specs(cfg))


@flax.struct.dataclass
class KVCache:
    """One layer's keys and values [B, K, S, hd] (heads first: a decode step reads the cache
    without transposing it), slot s holding position s."""
    k: jax.Array
    v: jax.Array

    @staticmethod
    def empty(batch: int, kv_heads: int, length: int, head_dim: int, dtype) -> "KVCache":
        zeros = jnp.zeros((batch, kv_heads, length, head_dim), dtype)
        return KVCache(zeros, zeros)

    def write_prefix(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """The block's k/v [B, T, K, hd] written at slots 0 .. T-1 (prefill)."""
        def put(cache, new):
            return jax.lax.dynamic_update_slice(
                cache, new.transpose(0, 2, 1, 3).astype(cache.dtype), (0, 0, 0, 0))
        return KVCache(put(self.k, k), put(self.v, v))

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> "KVCache":
        """Row b's new k/v [B, 1, K, hd] written at slot index[b] (decode)."""
        def put(cache, new):
            update = new.transpose(0, 2, 1, 3).astype(cache.dtype)  # [B, K, 1, hd]
            return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0)))(
                cache, update, index)
        return KVCache(put(self.k, k), put(self.v, v))


class Attention(nn.Module):
    """Self-attention with GQA, RoPE (per-layer frequencies), optional q/k norms, soft-cap and
    sliding window. Without a cache it attends over its own keys (training, scoring); with one,
    it also writes them there: `cache_index` None = prefill (slots 0 .. T-1, attending over the
    block itself), else decode (one token per row at slot cache_index[b], attending over the
    cache, whose slot s holds position s)."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        self.q = layers.Dense((d,), (h, hd), ("embed", "heads", "head_dim"), cfg.qkv_bias, **dense)
        self.k = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, **dense)
        self.v = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, **dense)
        self.o = layers.Dense((h, hd), (d,), ("heads", "head_dim", "embed"), False, **dense)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=_dtype(cfg.dtype),
                        param_dtype=_dtype(cfg.param_dtype))
            self.q_norm = layers.RMSNorm(**norm)
            self.k_norm = layers.RMSNorm(**norm)

    def __call__(self, x: jax.Array, layer: LayerSpec, positions: jax.Array, mask,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None):
        """x [B, T, D], positions i32[B, T], mask bool[B, 1, T, S] (or a SegmentMask)
        -> ([B, T, D], the updated cache or None)."""
        cfg = self.config
        q, k, v = self.q(x), self.k(x), self.v(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, positions, layer.inv_freq)
        k = layers.apply_rope(k, positions, layer.inv_freq)
        key_positions, heads_first = positions, False
        if cache is not None:
            if cache_index is None:
                cache = cache.write_prefix(k, v)
            else:
                cache = cache.write(k, v, cache_index)
                k, v, heads_first = cache.k, cache.v, True
                key_positions = jnp.arange(k.shape[2], dtype=jnp.int32)[None, :]
        if layer.window is not None:
            mask = layers.sliding_window_mask(mask, positions, key_positions, layer.window)
        out = layers.dot_product_attention(
            q, k, v, mask, backend=cfg.attention_backend, scale=cfg.query_pre_attn_scalar ** -0.5,
            logits_soft_cap=cfg.attn_logit_softcap or None, kv_heads_first=heads_first)
        return self.o(out), cache


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama, Qwen2) or tanh-GeGLU (Gemma)."""
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        gate = layers.Dense((cfg.hidden_size,), (cfg.mlp_dim,), ("embed", "mlp"), name="gate", **dense)(x)
        up = layers.Dense((cfg.hidden_size,), (cfg.mlp_dim,), ("embed", "mlp"), name="up", **dense)(x)
        if cfg.mlp_act == "silu":
            hidden = jax.nn.silu(gate)
        else:
            hidden = jax.nn.gelu(gate, approximate=True)
        return layers.Dense((cfg.mlp_dim,), (cfg.hidden_size,), ("mlp", "embed"), name="down",
                            **dense)(hidden * up)


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)) (Gemma 2 / 3: each branch normed again before the
    residual). Scanned: (carry, layer spec, *broadcast) -> (carry, None); generation calls it per
    layer with a cache and gets (x, cache) back."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=_dtype(cfg.dtype),
                    param_dtype=_dtype(cfg.param_dtype))
        self.pre_attention_norm = layers.RMSNorm(**norm)
        self.attention = Attention(cfg)
        self.pre_mlp_norm = layers.RMSNorm(**norm)
        self.mlp = GatedMLP(cfg)
        if cfg.post_norms:
            self.post_attention_norm = layers.RMSNorm(**norm)
            self.post_mlp_norm = layers.RMSNorm(**norm)

    def __call__(self, x: jax.Array, layer: LayerSpec, positions: jax.Array, mask,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None):
        h, cache = self.attention(self.pre_attention_norm(x), layer, positions, mask, cache,
                                  cache_index)
        if self.config.post_norms:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.config.post_norms:
            h = self.post_mlp_norm(h)
        return layers.constrain(x + h), cache


class TokenEmbedding(nn.Module):
    """The [V, D] table: lookup for inputs, and x @ table.T for a tied lm_head."""
    vocab_size: int
    hidden_size: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = layers.sharded_param(
            self, "embedding", nn.initializers.normal(stddev=self.hidden_size ** -0.5),
            (self.vocab_size, self.hidden_size), ("vocab", "embed"), self.param_dtype)

    def __call__(self, input_ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
        # The table's embed dimension is fsdp-sharded: each device looks up its slice of D for
        # the rows of its data group, and one all-to-all over fsdp then shards the rows by batch
        # like every activation. Left to propagation, with a tensor axis in the mesh SPMD found
        # no way from the first layout to the second but replicating [B, T, D] ("involuntary
        # full rematerialization").
        rows = jnp.take(self.embedding, input_ids, axis=0).astype(dtype)
        rows = layers.constrain(rows, ("batch_over_data", "length", "embed"))
        return layers.constrain(rows)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied logits f32[B, T, V] (f32 accumulation whatever the compute dtype)."""
        return jnp.einsum("btd,vd->btv", x, self.embedding.astype(x.dtype),
                          preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied output projection [D, V]; logits come out f32 whatever the compute dtype."""
    vocab_size: int
    hidden_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = layers.sharded_param(self, "kernel", nn.initializers.lecun_normal(),
                                      (self.hidden_size, self.vocab_size), ("embed", "vocab"),
                                      self.param_dtype)
        return jnp.einsum("btd,dv->btv", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


class Decoder(nn.Module):
    """The decoder: `embed` token ids, splice anything in, then `__call__`."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        param_dtype = _dtype(cfg.param_dtype)
        # Named explicitly: the attribute can't be `embed`, that is the public method's name.
        self.token_embedding = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, param_dtype,
                                              name="embed")
        self.blocks = self.make_blocks()
        self.final_norm = layers.RMSNorm(cfg.norm_eps, cfg.norm_plus_one, _dtype(cfg.dtype), param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, param_dtype)

    def make_blocks(self) -> nn.Module:
        """The scanned block stack, named "layers" (a subclass swaps the block, not the params)."""
        cfg = self.config
        return layers.stack_layers(DecoderBlock, cfg.num_layers, cfg.remat_policy,
                                   in_axes=(0, nn.broadcast, nn.broadcast),
                                   unroll=cfg.scan_unroll)(cfg, name="layers")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: i32[B, T] -> embeddings [B, T, D] in the compute dtype (Gemma: * sqrt(D))."""
        cfg = self.config
        x = self.token_embedding(input_ids, _dtype(cfg.dtype))
        if cfg.embed_scale:
            # HF rounds sqrt(D) to the compute dtype before multiplying (bf16: sqrt(3072) -> 55.5).
            x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype=x.dtype)
        return x

    def hidden_states(self, inputs_embeds: jax.Array, positions: jax.Array,
                      attention_mask: jax.Array, cross=None) -> jax.Array:
        """The final-normed hidden states [B, T, D] that the LM head reads (no logits: a loss
        that needs them at a few positions only applies `lm_head_weight` itself). `cross`: the
        image inputs of a cross-attention-fusion decoder (models/cross_attention.py)."""
        cfg = self.config
        if self.is_initializing() and not cfg.tie_embeddings:
            # `init` through __call__ alone must still create the (input-only) embedding table.
            self.token_embedding(jnp.zeros((1, 1), jnp.int32), _dtype(cfg.dtype))
        x = layers.constrain(inputs_embeds.astype(_dtype(cfg.dtype)))
        x = self.run_blocks(x, stacked_layer_specs(cfg), positions, attention_mask, cross)
        return self.final_norm(x)

    def run_blocks(self, x: jax.Array, specs: LayerSpec, positions: jax.Array, attention_mask,
                   cross=None) -> jax.Array:
        """The layer stack over x (a subclass runs more between the layers: FusedDecoder)."""
        if cross is not None:
            raise ValueError("this decoder has no cross-attention layers to read image inputs")
        x, _ = self.blocks(x, specs, positions, attention_mask)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> logits f32[B, T, V] (tied or untied head, then the
        final soft-cap when the config has one)."""
        if self.config.tie_embeddings:
            logits = self.token_embedding.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return layers.soft_cap(logits, self.config.final_logit_softcap)

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 return_hidden: bool = False, cross=None):
        """inputs_embeds [B, T, D], positions i32[B, T], attention_mask bool[B, 1, T, T]
        -> logits f32[B, T, V] (and the final-normed hidden [B, T, D] if `return_hidden`)."""
        hidden = self.hidden_states(inputs_embeds, positions, attention_mask, cross)
        logits = self.logits(hidden)
        if return_hidden:
            return logits, hidden
        return logits


def lm_head_weight(llm_params: dict, config: DecoderConfig) -> tuple[jax.Array, int]:
    """The LM head's matrix from the decoder's params and which of its axes is the vocabulary:
    the tied embedding table [V, D] (axis 0) or the untied kernel [D, V] (axis 1).
    logits = hidden @ W^T (axis 0) or hidden @ W (axis 1), as `Decoder.__call__` computes them."""
    if config.tie_embeddings:
        return llm_params["embed"]["embedding"], 0
    return llm_params["lm_head"]["kernel"], 1
