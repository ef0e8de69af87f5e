"""SigLIP towers: the ViT image encoder (patch tokens at a chosen layer, MAP-pooled embedding) and the text encoder.

Both towers share one pre-LN encoder block (LN -> MHA -> residual; LN -> tanh-GELU MLP -> residual)
stacked with `layers.stack_layers`, and match HF transformers' `SiglipVisionModel` /
`SiglipTextModel` numerically (see `vlm_jax/convert/hf_siglip.py` for the weight mapping).

Vision parameter tree (below the tower's own scope):
    patch_embedding/{kernel f32[p*p*3, D], bias}   patches flattened in (row, col, channel) order
    pos_embedding   f32[N, D]                      only for posemb="learn"
    encoder/{attention_norm, attention/{q,k,v,o}, mlp_norm, mlp/{fc1,fc2}}  leading 'layers' axis
    post_layernorm/{scale, bias}
    head/{probe f32[1, 1, D], attention/{q,k,v,o}, layernorm, mlp/{fc1,fc2}}   only with use_head
Text parameter tree:
    token_embedding f32[V, D], pos_embedding f32[L, D], encoder/..., final_norm, head/{kernel, bias}
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import ConfigError
from vlm_jax.models import layers

POSEMB_KINDS = ("learn", "sincos2d")
DTYPES = ("float32", "bfloat16", "float16")


def _check_compute_fields(cfg, where: str) -> None:
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ConfigError(f"{where}.{name}={getattr(cfg, name)!r}; supported: {DTYPES}")
    if cfg.attention_backend not in layers.ATTENTION_BACKENDS:
        raise ConfigError(f"{where}.attention_backend={cfg.attention_backend!r}; "
                          f"supported: {layers.ATTENTION_BACKENDS}")
    if cfg.remat_policy not in layers.REMAT_POLICIES:
        raise ConfigError(f"{where}.remat_policy={cfg.remat_policy!r}; "
                          f"supported: {tuple(layers.REMAT_POLICIES)}")
    if not isinstance(cfg.scan_unroll, int) or cfg.scan_unroll < 1:
        raise ConfigError(f"{where}.scan_unroll={cfg.scan_unroll!r} must be an integer >= 1 "
                          f"(encoder layers per loop iteration)")
    if cfg.width % cfg.num_heads:
        raise ConfigError(f"{where}.width={cfg.width} is not a multiple of num_heads={cfg.num_heads}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT. Defaults are google/siglip-base-patch16-224."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6
    # Index into HF's `hidden_states` (depth + 1 entries): 0 = patch + position embeddings,
    # i = output of encoder layer i, negative counts from the end (-1 = last layer, before
    # post_layernorm: what LLaVA reads; LLaVA-1.5 uses -2).
    feature_layer: int = -1
    # LayerNorm the tokens at feature_layer with post_layernorm: at the last layer, HF's
    # `last_hidden_state`, which PaliGemma's projector reads (LLaVA reads the un-normed ones).
    feature_post_norm: bool = False
    use_head: bool = True          # MAP attention-pooling head (HF `vision_use_head`)
    posemb: str = "learn"          # "learn" (HF) or "sincos2d" (fixed, no parameter)
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"
    remat_policy: str = "none"
    scan_unroll: int = 1           # layers per loop iteration (layers.stack_layers)

    def __post_init__(self):
        where = "model.vision"
        _check_compute_fields(self, where)
        if self.posemb not in POSEMB_KINDS:
            raise ConfigError(f"{where}.posemb={self.posemb!r}; supported: {POSEMB_KINDS}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ConfigError(f"{where}.posemb='sincos2d' needs width % 4 == 0, got width={self.width}")
        if not -(self.depth + 1) <= self.feature_layer <= self.depth:
            raise ConfigError(f"{where}.feature_layer={self.feature_layer} is outside "
                              f"[{-(self.depth + 1)}, {self.depth}] for depth={self.depth}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"{where}.image_size={self.image_size} < patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_depth(self) -> int:
        """How many encoder layers run before `feature_layer` is read."""
        return self.feature_layer % (self.depth + 1)


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """SigLIP text encoder. Defaults are google/siglip-base-patch16-224."""
    vocab_size: int = 32000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 64              # HF max_position_embeddings
    projection_dim: int = 768      # HF projection_size: width of the pooled output
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "auto"
    remat_policy: str = "none"
    scan_unroll: int = 1           # layers per loop iteration (layers.stack_layers)

    def __post_init__(self):
        _check_compute_fields(self, "model.text_tower")


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    """Multi-head attention with biases; queries from `x`, keys/values from `context`."""
    width: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        head_dim = self.width // self.num_heads
        heads = (self.num_heads, head_dim)

        def proj(name):
            return layers.Dense((self.width,), heads, ("embed", "heads", "head_dim"), use_bias=True,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q = proj("q")(x)            # [B, T, H, hd]
        k = proj("k")(context)      # [B, S, H, hd]
        v = proj("v")(context)
        out = layers.dot_product_attention(q, k, v, mask, backend=self.attention_backend)
        return layers.Dense(heads, (self.width,), ("heads", "head_dim", "embed"), use_bias=True,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="o")(out)


class Mlp(nn.Module):
    """fc1 -> tanh-approximate GELU (HF `gelu_pytorch_tanh`) -> fc2."""
    width: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.Dense((self.width,), (self.mlp_dim,), ("embed", "mlp"), use_bias=True,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        return layers.Dense((self.mlp_dim,), (self.width,), ("mlp", "embed"), use_bias=True,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


class EncoderBlock(nn.Module):
    """One pre-LN transformer layer, written as an `nn.scan` body.

    carry = (x f32[B, T, D], layer_index i32[]). When `num_active_layers` (i32[]) is given, layers
    at index >= it are skipped with `nn.cond`, so reading an early `feature_layer` does not pay for
    the layers after it while the parameters of all layers stay in one stacked tree.
    """
    width: int
    num_heads: int
    mlp_dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention_norm = layers.LayerNorm(self.eps, **kw)
        self.attention = Attention(self.width, self.num_heads, attention_backend=self.attention_backend,
                                   **kw)
        self.mlp_norm = layers.LayerNorm(self.eps, **kw)
        self.mlp = Mlp(self.width, self.mlp_dim, **kw)

    def layer(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = layers.constrain(x)
        h = self.attention_norm(x)
        x = x + self.attention(h, h, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return layers.constrain(x)

    def __call__(self, carry, mask: jax.Array | None, num_active_layers: jax.Array | None):
        x, layer_index = carry
        # Parameters are created on the direct path: nn.cond needs both branches to hold the same
        # variables, and the skip branch holds none.
        if num_active_layers is None or self.is_initializing():
            x = self.layer(x, mask)
        else:
            x = nn.cond(layer_index < num_active_layers,
                        lambda block, x, mask: block.layer(x, mask),
                        lambda block, x, mask: x,
                        self, x, mask)
        return (x, layer_index + 1), None


def _encoder(cfg, name: str = "encoder") -> nn.Module:
    stack = layers.stack_layers(EncoderBlock, cfg.depth, cfg.remat_policy,
                                unroll=cfg.scan_unroll)
    return stack(width=cfg.width, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, eps=cfg.layer_norm_eps,
                 dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                 attention_backend=cfg.attention_backend, name=name)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then LN + MLP residual."""
    width: int
    num_heads: int
    mlp_dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = layers.sharded_param(self, "probe", nn.initializers.xavier_uniform(),
                                     (1, 1, self.width), (None, None, "embed"), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, self.width))
        h = Attention(self.width, self.num_heads, attention_backend=self.attention_backend,
                      name="attention", **kw)(probe, x, None)            # [B, 1, D]
        h = h + Mlp(self.width, self.mlp_dim, name="mlp", **kw)(
            layers.LayerNorm(self.eps, name="layernorm", **kw)(h))
        return h[:, 0]


# ----------------------------------------------------------------------------- position embeddings

def posemb_sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.) -> np.ndarray:
    """Fixed 2-D sin-cos table f32[grid_h * grid_w, width] (big_vision's layout: sin x, cos x, sin y, cos y)."""
    y, x = np.mgrid[:grid_h, :grid_w]
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    y = np.einsum("m,d->md", y.reshape(-1), omega)
    x = np.einsum("m,d->md", x.reshape(-1), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """f32[out_size, in_size] such that `m @ v` is torch's bicubic `interpolate(align_corners=False)`.

    torch uses the cubic-convolution kernel with a = -0.75 (not -0.5 as jax.image.resize), no
    antialiasing, and clamps the four taps to the border; matching it is what makes HF
    `interpolate_pos_encoding=True` and our resized position tables agree.
    """
    a = -0.75

    def near(t):   # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):    # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        left = math.floor(src)
        t = src - left
        for tap, w in zip(range(left - 1, left + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(tap, 0), in_size - 1)] += w
    return m.astype(np.float32)


# ----------------------------------------------------------------------------- vision tower

class SiglipVisionTower(nn.Module):
    """SigLIP ViT. `__call__` gives patch tokens at `feature_layer`; `pool` the MAP-pooled embedding."""
    config: VisionConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embedding = layers.Dense((cfg.patch_size * cfg.patch_size * 3,), (cfg.width,),
                                            ("patch", "embed"), use_bias=True, **kw)
        if cfg.posemb == "learn":
            self.pos_embedding = layers.sharded_param(
                self, "pos_embedding", nn.initializers.normal(stddev=cfg.width ** -0.5),
                (cfg.num_patches, cfg.width), ("pos", "embed"), param_dtype)
        self.encoder = _encoder(cfg)
        self.post_layernorm = layers.LayerNorm(cfg.layer_norm_eps, **kw)
        if cfg.use_head:
            self.head = MAPHead(cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps,
                                attention_backend=cfg.attention_backend, **kw)

    def embed(self, images: jax.Array) -> jax.Array:
        """images f32[B, H, W, 3] -> patch + position embeddings f32[B, (H//p) * (W//p), D]."""
        cfg = self.config
        p = cfg.patch_size
        b, h, w, c = images.shape
        if c != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
        gh, gw = h // p, w // p
        # Pixels past the last whole patch are dropped, as a stride-p VALID conv does.
        patches = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        x = self.patch_embedding(patches.astype(jnp.dtype(cfg.dtype)))   # [B, N, D]
        return layers.constrain(x + self.position_table(gh, gw).astype(x.dtype)[None])

    def position_table(self, grid_h: int, grid_w: int) -> jax.Array:
        """f32[grid_h * grid_w, D]; a learned table is bicubic-resized when the grid differs."""
        cfg = self.config
        if cfg.posemb == "sincos2d":
            return jnp.asarray(posemb_sincos_2d(grid_h, grid_w, cfg.width))
        side = cfg.image_size // cfg.patch_size
        table = self.pos_embedding
        if (grid_h, grid_w) == (side, side):
            return table
        resize_h = jnp.asarray(bicubic_resize_matrix(side, grid_h))
        resize_w = jnp.asarray(bicubic_resize_matrix(side, grid_w))
        grid = table.astype(jnp.float32).reshape(side, side, cfg.width)
        grid = jnp.einsum("yh,xw,hwd->yxd", resize_h, resize_w, grid,
                          precision=jax.lax.Precision.HIGHEST)
        return grid.reshape(grid_h * grid_w, cfg.width)

    def _run_encoder(self, x: jax.Array, num_layers: int) -> jax.Array:
        cfg = self.config
        if num_layers == 0:
            return x
        active = None if num_layers == cfg.depth else jnp.asarray(num_layers, jnp.int32)
        (x, _), _ = self.encoder((x, jnp.zeros((), jnp.int32)), None, active)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        """images f32[B, H, W, 3] -> patch tokens f32[B, N, D] at `config.feature_layer`."""
        cfg = self.config
        x = self.embed(images)
        if self.is_initializing():
            # Create every parameter (later layers, post-LN, head) so export and `pool` find them.
            self.encode_embedded(x)
        x = self._run_encoder(x, cfg.feature_depth)
        return self.post_layernorm(x) if cfg.feature_post_norm else x

    def encode_embedded(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        x = self.post_layernorm(self._run_encoder(x, self.config.depth))
        return x, (self.head(x) if self.config.use_head else None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Full depth: (post-LN last hidden state f32[B, N, D], MAP-pooled f32[B, D] or None)
        = HF `SiglipVisionModel` (last_hidden_state, pooler_output)."""
        return self.encode_embedded(self.embed(images))

    def pool(self, images: jax.Array) -> jax.Array:
        """images f32[B, H, W, 3] -> MAP-pooled embedding f32[B, D] (needs `use_head`)."""
        if not self.config.use_head:
            raise ValueError("SiglipVisionTower.pool needs model.vision.use_head=True")
        return self.encode(images)[1]


# ----------------------------------------------------------------------------- text tower

class SiglipTextTower(nn.Module):
    """SigLIP text encoder: bidirectional, pooled from the last position (HF `SiglipTextModel`).

    SigLIP is trained on text padded to `max_len` with no attention mask: the padding is part of
    the input and the last position (usually a pad token) carries the pooled embedding. HF accepts
    an optional key-padding mask; so do we, with the same meaning.
    """
    config: TextTowerConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(stddev=cfg.width ** -0.5)
        self.token_embedding = layers.sharded_param(self, "token_embedding", init,
                                                    (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                                                    param_dtype)
        self.pos_embedding = layers.sharded_param(self, "pos_embedding", init, (cfg.max_len, cfg.width),
                                                  ("pos", "embed"), param_dtype)
        self.encoder = _encoder(cfg)
        self.final_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.head = layers.Dense((cfg.width,), (cfg.projection_dim,), ("embed", None), use_bias=True,
                                 dtype=dtype, param_dtype=param_dtype)

    def encode(self, text_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """text_ids i32[B, L] (+ optional bool/int[B, L] key-padding mask) ->
        (final-LN hidden states f32[B, L, D], pooled f32[B, P])."""
        cfg = self.config
        length = text_ids.shape[-1]
        if length > cfg.max_len:
            raise ValueError(f"text length {length} exceeds model.text_tower.max_len={cfg.max_len}")
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.token_embedding, text_ids, axis=0) + self.pos_embedding[:length][None]
        x = layers.constrain(x.astype(dtype))
        mask = None
        if attention_mask is not None:
            # Key padding only (HF's bidirectional mask): pad queries still read the real tokens,
            # which matters because the pooled position is usually a pad.
            keys = attention_mask.astype(bool)[:, None, None, :]
            mask = jnp.broadcast_to(keys, (text_ids.shape[0], 1, length, length))
        (x, _), _ = self.encoder((x, jnp.zeros((), jnp.int32)), mask, None)
        x = self.final_norm(x)
        return x, self.head(x[:, -1])

    def __call__(self, text_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """text_ids i32[B, L] -> pooled embedding f32[B, P]."""
        return self.encode(text_ids, attention_mask)[1]


def contrastive_logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                       logit_bias: jax.Array) -> jax.Array:
    """SigLIP pair logits f32[B_img, B_txt]: cosine similarity * exp(logit_scale) + logit_bias
    (HF `SiglipModel.logits_per_image`)."""
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return img @ txt.T * jnp.exp(logit_scale.reshape(())) + logit_bias.reshape(())
