"""The projector: maps vision-tower patch tokens into the language model's embedding space.

Four kinds, chosen by `ProjectorConfig.type`:

  linear          one Linear (LLaVA-1)                                  tokens out = tokens in
  mlp2x_gelu      Linear -> GELU -> Linear (LLaVA-1.5)                  tokens out = tokens in
  pixel_shuffle   fold s x s neighbouring patches into one token, then an MLP (nanoVLM / Idefics3)
                                                                        tokens out = tokens in / s^2
  resampler       learned queries cross-attend to the patch tokens (Perceiver / Q-Former style)
                                                                        tokens out = num_queries

To add a projector: write a module below taking (tokens f32[B, N, Dv]) -> f32[B, N', Dt],
register it in `Projector.__call__`, and teach `num_output_tokens` its token count.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import ConfigError
from vlm_jax.models import layers

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "pixel_shuffle", "resampler")
ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
               "silu": nn.silu, "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    type: str = "mlp2x_gelu"
    act: str = "gelu"                 # HF LLaVA's projector_hidden_act: exact (erf) GELU
    bias: bool = True                 # HF LLaVA's multimodal_projector_bias
    # LayerNorm each vision token before projecting (Qwen2-VL's patch merger does this): the
    # features LLaVA reads are un-normalised residual streams, norms ~10-100x a text embedding's.
    input_norm: bool = False
    # A learned embedding per output token (its place on the image grid), added to the MLP's
    # input, initialised N(0, 1) (the scale of LayerNormed features: use with input_norm).
    # Position survives a vision tower's last layers only faintly, and a random projection loses
    # most of it: on the shapes recipe a linear probe read an object's grid cell from the encoder
    # tokens 100% of the time but from the projected ones 66-78%.
    pos_embed: bool = False
    mlp_depth: int = 2                # pixel_shuffle: Linear layers after the shuffle (1 = nanoVLM)
    hidden_dim: int = 0               # pixel_shuffle: width between those layers (0 = the LLM's)
    pixel_shuffle_factor: int = 2     # pixel_shuffle: s (tokens cut s^2-fold)
    num_queries: int = 64             # resampler: output tokens
    resampler_depth: int = 2          # resampler: cross-attention blocks
    resampler_heads: int = 8
    resampler_mlp_ratio: int = 4
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"

    def __post_init__(self):
        if self.type not in PROJECTOR_TYPES:
            raise ConfigError(f"model.projector.type={self.type!r}; supported: {PROJECTOR_TYPES}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"model.projector.act={self.act!r}; supported: {tuple(ACTIVATIONS)}")
        if self.pos_embed and self.type == "resampler":
            raise ConfigError("model.projector.pos_embed=True is for grid projectors (linear, "
                              "mlp2x_gelu, pixel_shuffle); a resampler's queries are its positions")


def num_output_tokens(config: ProjectorConfig, num_patches: int) -> int:
    """Image tokens the LLM sees per image, for a vision tower emitting `num_patches` tokens."""
    if config.type == "pixel_shuffle":
        side = math.isqrt(num_patches)
        s = config.pixel_shuffle_factor
        if side * side != num_patches or side % s:
            raise ConfigError(
                f"pixel_shuffle_factor={s} needs a square patch grid whose side divides by {s}; "
                f"the vision tower emits {num_patches} patches")
        return num_patches // (s * s)
    if config.type == "resampler":
        return config.num_queries
    return num_patches


def pixel_shuffle(tokens: jax.Array, factor: int) -> jax.Array:
    """f32[B, N, D] on a sqrt(N) x sqrt(N) grid -> f32[B, N / s^2, D * s^2].

    Each output token concatenates an s x s block of neighbouring patches (row-major inside the
    block), so spatial detail moves into channels and the LLM sees s^2 times fewer tokens.
    """
    b, n, d = tokens.shape
    side = math.isqrt(n)
    s = factor
    x = tokens.reshape(b, side // s, s, side // s, s, d)     # [B, Hb, sy, Wb, sx, D]
    x = x.transpose(0, 1, 3, 2, 4, 5)                         # [B, Hb, Wb, sy, sx, D]
    return x.reshape(b, (side // s) ** 2, s * s * d)


class MLP(nn.Module):
    """Linear layers with an activation between them; kernels named linear_1, linear_2, ..."""
    features: tuple[int, ...]
    act: str
    bias: bool
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, out_dim in enumerate(self.features):
            if i:
                x = ACTIVATIONS[self.act](x)
            x = layers.Dense((x.shape[-1],), (out_dim,), ("embed", "mlp"), use_bias=self.bias,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"linear_{i + 1}")(x)
        return x


class ResamplerBlock(nn.Module):
    """Latents cross-attend to [image tokens; latents] (Flamingo's Perceiver resampler), then an MLP."""
    num_heads: int
    mlp_ratio: int
    dtype: str
    param_dtype: str
    attention_backend: str

    @nn.compact
    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        d = latents.shape[-1]
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_in = layers.LayerNorm(name="ln_latents", **kw)(latents)
        kv_in = jnp.concatenate([layers.LayerNorm(name="ln_media", **kw)(media), q_in], axis=1)
        heads = (self.num_heads, head_dim)
        q = layers.Dense((d,), heads, ("embed", "heads", "head_dim"), name="q", **kw)(q_in)
        k = layers.Dense((d,), heads, ("embed", "heads", "head_dim"), name="k", **kw)(kv_in)
        v = layers.Dense((d,), heads, ("embed", "heads", "head_dim"), name="v", **kw)(kv_in)
        attn = layers.dot_product_attention(q, k, v, None, backend=self.attention_backend)
        latents = latents + layers.Dense(heads, (d,), ("heads", "head_dim", "embed"), name="o",
                                         **kw)(attn)
        h = layers.LayerNorm(name="ln_mlp", **kw)(latents)
        h = MLP((d * self.mlp_ratio, d), "gelu", True, name="mlp", **kw)(h)
        return latents + h


class Projector(nn.Module):
    """Vision tokens f32[B, N, Dv] -> LLM input embeddings f32[B, N', out_dim]."""
    config: ProjectorConfig
    out_dim: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.input_norm:
            tokens = layers.LayerNorm(name="input_norm", **kw)(tokens)
        if cfg.type == "linear":
            features = (self.out_dim,)
        elif cfg.type == "mlp2x_gelu":
            features = (self.out_dim, self.out_dim)
        elif cfg.type == "pixel_shuffle":
            num_output_tokens(cfg, tokens.shape[1])  # validates the grid
            tokens = pixel_shuffle(tokens, cfg.pixel_shuffle_factor)
            features = (cfg.hidden_dim or self.out_dim,) * (cfg.mlp_depth - 1) + (self.out_dim,)
        if cfg.type != "resampler":
            if cfg.pos_embed:
                table = layers.sharded_param(self, "pos_embed", nn.initializers.normal(1.0),
                                             tokens.shape[1:], (None, "embed"), cfg.param_dtype)
                tokens = tokens + table.astype(tokens.dtype)
            return MLP(features, cfg.act, cfg.bias, name="mlp", **kw)(tokens)
        # resampler: queries live in the LLM width; image tokens are first mapped to it.
        media = layers.Dense((tokens.shape[-1],), (self.out_dim,), ("embed", "mlp"), use_bias=True,
                             name="media_proj", **kw)(tokens)
        latents = layers.sharded_param(self, "queries", nn.initializers.normal(0.02),
                                       (cfg.num_queries, self.out_dim), (None, "embed"),
                                       cfg.param_dtype)
        latents = jnp.broadcast_to(latents.astype(cfg.dtype), (tokens.shape[0],) + latents.shape)
        for i in range(cfg.resampler_depth):
            latents = ResamplerBlock(cfg.resampler_heads, cfg.resampler_mlp_ratio,
                                     attention_backend=cfg.attention_backend,
                                     name=f"block_{i}", **kw)(latents, media)
        return layers.LayerNorm(name="ln_out", **kw)(latents)
