"""The decoder LLM: one pre-norm RoPE transformer that is Llama 2/3, Qwen2 or Gemma 1 by config.

The families differ only in switches carried by `DecoderConfig`:

    llama   SwiGLU MLP, RMSNorm(w), no biases, optional Llama-3 rope scaling
    qwen2   llama + biases on the q/k/v projections
    gemma   GeGLU (tanh) MLP, RMSNorm applied as (1 + w), embeddings scaled by sqrt(hidden_size),
            head_dim independent of hidden_size / num_heads, tied lm_head

Param tree (below the module's own name; blocks are scanned, so every `layers/...` param has a
leading [num_layers] axis named 'layers'):

    embed/embedding                    [V, D]        ('vocab', 'embed')
    layers/pre_attention_norm/scale    [D]
    layers/attention/{q}/kernel        [D, H, hd]    ('embed', 'heads', 'head_dim')
    layers/attention/{k,v}/kernel      [D, K, hd]    ('embed', 'kv_heads', 'head_dim')
    layers/attention/{q,k,v}/bias      [H|K, hd]     (qkv_bias only)
    layers/attention/o/kernel          [H, hd, D]    ('heads', 'head_dim', 'embed')
    layers/pre_mlp_norm/scale          [D]
    layers/mlp/{gate,up}/kernel        [D, F]        ('embed', 'mlp')
    layers/mlp/down/kernel             [F, D]        ('mlp', 'embed')
    final_norm/scale                   [D]
    lm_head/kernel                     [D, V]        ('embed', 'vocab')   untied only

Gemma's sqrt(hidden_size) embedding scale is applied in `Decoder.embed`, to token embeddings
only, as transformers 5.x (`GemmaTextScaledWordEmbedding`) and big_vision do: image features
spliced into the sequence afterwards are not scaled.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import from_dict
from vlm_jax.errors import ConfigError
from vlm_jax.models import layers

FAMILIES = ("llama", "qwen2", "gemma")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder; every field is a scalar so the config is hashable."""
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1408
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 rope scaling: all four set, or all None (plain RoPE).
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    qkv_bias: bool = False
    mlp_act: str = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    # compute fields
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"
    remat_policy: str = "none"

    def __post_init__(self):
        def check(ok: bool, field: str, supported: str):
            if not ok:
                raise ConfigError(f"DecoderConfig.{field}={getattr(self, field)!r}; supported: {supported}")
        check(self.family in FAMILIES, "family", str(FAMILIES))
        check(self.mlp_act in MLP_ACTIVATIONS, "mlp_act", str(MLP_ACTIVATIONS))
        check(self.dtype in DTYPES, "dtype", str(DTYPES))
        check(self.param_dtype in DTYPES, "param_dtype", str(DTYPES))
        check(self.attention_backend in layers.ATTENTION_BACKENDS, "attention_backend",
              str(layers.ATTENTION_BACKENDS))
        check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy", str(tuple(layers.REMAT_POLICIES)))
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            check(getattr(self, field) > 0, field, "a positive integer")
        check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "a positive even integer (RoPE)")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
              f"a divisor of num_heads={self.num_heads}")
        scaling = (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                   self.rope_original_max_position_embeddings)
        check(all(v is None for v in scaling) or all(v is not None for v in scaling),
              "rope_scaling_factor", "the four rope_* scaling fields all set (Llama-3 scaling) or all None")

    @property
    def rope_scaling(self) -> dict | None:
        """The Llama-3 scaling dict that `layers.rope_inv_freq` takes, or None."""
        if self.rope_scaling_factor is None:
            return None
        return {"rope_type": "llama3", "factor": self.rope_scaling_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings}


FAMILY_DEFAULTS = {
    "llama": dict(family="llama", qkv_bias=False, mlp_act="silu", norm_plus_one=False,
                  embed_scale=False, tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0),
    "qwen2": dict(family="qwen2", qkv_bias=True, mlp_act="silu", norm_plus_one=False,
                  embed_scale=False, tie_embeddings=False, norm_eps=1e-6, rope_theta=1000000.0),
    "gemma": dict(family="gemma", qkv_bias=False, mlp_act="gelu_tanh", norm_plus_one=True,
                  embed_scale=True, tie_embeddings=True, norm_eps=1e-6, rope_theta=10000.0),
}


def decoder_config(family: str, **overrides) -> DecoderConfig:
    """The family's structural defaults (biases, activation, norm form, ...) plus `overrides`."""
    if family not in FAMILY_DEFAULTS:
        raise ConfigError(f"decoder family {family!r}; supported: {tuple(FAMILY_DEFAULTS)}")
    return from_dict(DecoderConfig, {**FAMILY_DEFAULTS[family], **overrides}, where="decoder")


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Attention(nn.Module):
    """Self-attention split into projection (+RoPE), attention and output so a KV cache can sit
    between `project_qkv` and `attend` (cached k/v concatenated along S) without touching weights."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        self.q = layers.Dense((d,), (h, hd), ("embed", "heads", "head_dim"), cfg.qkv_bias, **dense)
        self.k = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, **dense)
        self.v = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, **dense)
        self.o = layers.Dense((h, hd), (d,), ("heads", "head_dim", "embed"), False, **dense)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """x: [B, T, D], positions: i32[B, T] -> q [B, T, H, hd], k/v [B, T, K, hd] (q, k rotated)."""
        cfg = self.config
        inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = layers.apply_rope(self.q(x), positions, inv_freq)
        k = layers.apply_rope(self.k(x), positions, inv_freq)
        return q, k, self.v(x)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q [B, T, H, hd], k/v [B, S, K, hd], mask bool[B, 1, T, S] -> [B, T, D]."""
        out = layers.dot_product_attention(q, k, v, mask, backend=self.config.attention_backend)
        return self.o(out)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.project_qkv(x, positions)
        return self.attend(q, k, v, mask)


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
    """x + attn(norm(x)), then x + mlp(norm(x)). Scanned: (carry, *broadcast) -> (carry, None).

    `attention_inputs` and `finish` are the two halves around the attention call: generation
    (`vlm_jax.generate`) calls them to keep each layer's k/v in its cache, on this param tree.
    """
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=_dtype(cfg.dtype),
                    param_dtype=_dtype(cfg.param_dtype))
        self.pre_attention_norm = layers.RMSNorm(**norm)
        self.attention = Attention(cfg)
        self.pre_mlp_norm = layers.RMSNorm(**norm)
        self.mlp = GatedMLP(cfg)

    def attention_inputs(self, x: jax.Array, positions: jax.Array):
        """Rotated q and k, and v for the block input x: [B, T, D] (the cache's entry point)."""
        return self.attention.project_qkv(self.pre_attention_norm(x), positions)

    def finish(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
        """The rest of the block given (possibly cache-extended) k/v [B, S, K, hd]."""
        x = x + self.attention.attend(q, k, v, mask)
        x = x + self.mlp(self.pre_mlp_norm(x))
        return layers.constrain(x)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array):
        q, k, v = self.attention_inputs(x, positions)
        return self.finish(x, q, k, v, mask), None


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
        return jnp.take(self.embedding, input_ids, axis=0).astype(dtype)

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
    """Llama / Qwen2 / Gemma decoder: `embed` token ids, splice anything in, then `__call__`."""
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
        return layers.stack_layers(DecoderBlock, cfg.num_layers, cfg.remat_policy)(
            cfg, name="layers")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: i32[B, T] -> embeddings [B, T, D] in the compute dtype (Gemma: * sqrt(D))."""
        cfg = self.config
        x = self.token_embedding(input_ids, _dtype(cfg.dtype))
        if cfg.embed_scale:
            # HF rounds sqrt(D) to the compute dtype before multiplying (bf16: sqrt(3072) -> 55.5).
            x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype=x.dtype)
        return x

    def hidden_states(self, inputs_embeds: jax.Array, positions: jax.Array,
                      attention_mask: jax.Array) -> jax.Array:
        """The final-normed hidden states [B, T, D] that the LM head reads (no logits: a loss
        that needs them at a few positions only applies `lm_head_weight` itself)."""
        cfg = self.config
        if self.is_initializing() and not cfg.tie_embeddings:
            # `init` through __call__ alone must still create the (input-only) embedding table.
            self.token_embedding(jnp.zeros((1, 1), jnp.int32), _dtype(cfg.dtype))
        x = layers.constrain(inputs_embeds.astype(_dtype(cfg.dtype)))
        x, _ = self.blocks(x, positions, attention_mask)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> logits f32[B, T, V] (tied or untied head)."""
        if self.config.tie_embeddings:
            return self.token_embedding.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 return_hidden: bool = False):
        """inputs_embeds [B, T, D], positions i32[B, T], attention_mask bool[B, 1, T, T]
        -> logits f32[B, T, V] (and the final-normed hidden [B, T, D] if `return_hidden`)."""
        hidden = self.hidden_states(inputs_embeds, positions, attention_mask)
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
