"""Cross-attention fusion (Flamingo; Llama 3.2 Vision's `MllamaCrossAttentionDecoderLayer`): the
text attends to the projected image tokens through gated blocks that run before chosen decoder
layers (`VLMConfig.cross_attention_layers`), so the LLM's sequence holds one marker token per
image however many tokens the image has.

    x = x + tanh(attention_gate) * CrossAttention(pre_attention_norm(x), image tokens)
    x = x + tanh(mlp_gate) * rows * MLP(pre_mlp_norm(x))

The gates start at 0, so an imported LLM computes exactly what it did alone until they move.
q comes from the text, k / v from the image tokens (the projector's output, in the LLM's width),
with an RMSNorm over each head of q and k, no RoPE (the image tokens carry their position in their
features) and GQA like the decoder's own attention; the MLP is the decoder family's.

Which image a text token sees: the k-th image-token id (the marker) of a row stands for the k-th
image of that row, and a token sees the images whose marker is at or before it *in its own
example* (same segment id): packed rows stay isolated. A token that sees no image (the text
before the first image) gets no cross-attention output and no MLP output (`rows`).
Conventions against transformers' Mllama (tests/test_cross_attention.py): the block is the same
function (norms, gates, q/k norm, GQA, scale hd^-0.5). Mllama's own mask, where a text row sees no
image, attends uniformly to every image token and adds that to the residual; here that row's
attention output is zeroed as well as its MLP output, because under packing "every image token"
would be another example's image.

Param tree (`cross_attention/`, each leaf with a leading [num_blocks] axis named 'layers'):
    pre_attention_norm/scale, attention/{q,k,v,o}/kernel, attention/{q,k}_norm/scale,
    attention_gate [1], pre_mlp_norm/scale, mlp/{gate,up,down}/kernel, mlp_gate [1]
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers
from vlm_jax.models.decoder import Decoder, DecoderBlock, DecoderConfig, GatedMLP

FUSIONS = ("early", "cross_attention")


@flax.struct.dataclass
class CrossInputs:
    """What the cross-attention blocks read, broadcast to every decoder layer.

    params: the blocks' params, stacked [num_blocks, ...]; images: image tokens [B, N, D];
    mask: bool[B, 1, T, N] (query t may see image token n); rows: bool[B, T, 1] (t sees any)."""
    params: dict
    images: jax.Array
    mask: jax.Array
    rows: jax.Array


def image_visibility(input_ids: jax.Array, image_token_id: int, num_images: int,
                     tokens_per_image: int, segment_ids: jax.Array | None = None):
    """(mask bool[B, 1, T, M * n], rows bool[B, T, 1]) for rows holding one marker per image.

    Image m of a row is present when the row has at least m + 1 markers; query t sees it when
    its marker sits at or before t in the same segment."""
    is_marker = input_ids == image_token_id                                   # [B, T]
    order = jnp.cumsum(is_marker, axis=1)                                     # markers so far
    hits = is_marker[:, :, None] & (order[:, :, None] == jnp.arange(1, num_images + 1))  # [B, T, M]
    present = hits.any(axis=1)                                                # [B, M]
    marker_pos = jnp.argmax(hits, axis=1)                                     # [B, M]
    t = jnp.arange(input_ids.shape[1])
    sees = present[:, None, :] & (marker_pos[:, None, :] <= t[None, :, None])  # [B, T, M]
    if segment_ids is not None:
        image_segment = jnp.take_along_axis(segment_ids, marker_pos, axis=1)   # [B, M]
        sees = sees & (segment_ids[:, :, None] == image_segment[:, None, :])
    mask = jnp.repeat(sees, tokens_per_image, axis=2)[:, None]               # [B, 1, T, M*n]
    return mask, sees.any(axis=2)[..., None]


class CrossAttention(nn.Module):
    """Text queries over image keys / values: GQA, q / k RMSNorm per head, no RoPE."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.q = layers.Dense((d,), (h, hd), ("embed", "heads", "head_dim"), **dense)
        self.k = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), **dense)
        self.v = layers.Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), **dense)
        self.o = layers.Dense((h, hd), (d,), ("heads", "head_dim", "embed"), **dense)
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype))
        self.q_norm = layers.RMSNorm(**norm)
        self.k_norm = layers.RMSNorm(**norm)

    def image_kv(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image tokens [B, N, D] -> (k, v) [B, N, K, hd] (generation computes them once)."""
        return self.k_norm(self.k(images)), self.v(images)

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        q = self.q_norm(self.q(x))
        # The dense-mask path whatever the decoder's backend: the mask is not causal, and a row
        # that sees nothing must stay finite (it is zeroed after).
        out = layers.dot_product_attention(q, kv[0], kv[1], mask, backend="xla",
                                           scale=self.config.head_dim ** -0.5)
        return self.o(out)


class CrossAttentionBlock(nn.Module):
    """One gated cross-attention block (module docstring)."""
    config: DecoderConfig

    def setup(self):
        cfg = self.config
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype))
        self.pre_attention_norm = layers.RMSNorm(**norm)
        self.attention = CrossAttention(cfg)
        self.pre_mlp_norm = layers.RMSNorm(**norm)
        self.mlp = GatedMLP(cfg)
        gate = dict(init=nn.initializers.zeros, shape=(1,), axes=("norm",),
                    dtype=jnp.dtype(cfg.param_dtype))
        self.attention_gate = layers.sharded_param(self, "attention_gate", **gate)
        self.mlp_gate = layers.sharded_param(self, "mlp_gate", **gate)

    def image_kv(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.attention.image_kv(images)

    def attend(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], mask: jax.Array,
               rows: jax.Array) -> jax.Array:
        """x [B, T, D] through the block, the image's (k, v) given."""
        h = self.attention(self.pre_attention_norm(x), kv, mask)
        # where, not a product: 0 * a non-finite value would not be 0
        h = jnp.where(rows, h, jnp.zeros((), h.dtype))
        x = x + jnp.tanh(self.attention_gate).astype(x.dtype) * h
        h = jnp.where(rows, self.mlp(self.pre_mlp_norm(x)), jnp.zeros((), x.dtype))
        return x + jnp.tanh(self.mlp_gate).astype(x.dtype) * h

    def __call__(self, x: jax.Array, images: jax.Array, mask: jax.Array, rows: jax.Array):
        """(x, None): the scanned stack's signature (used to create the params)."""
        return self.attend(x, self.image_kv(images), mask, rows), None


def cross_attention_stack(config: DecoderConfig, num_blocks: int, name: str) -> nn.Module:
    """The stacked blocks (params [num_blocks, ...]); called once at init to create them, their
    params then read by `FusedDecoder` one block at a time."""
    return layers.stack_layers(CrossAttentionBlock, num_blocks, "none",
                               in_axes=(nn.broadcast, nn.broadcast, nn.broadcast))(config, name=name)


def block_params(stacked: dict, index) -> dict:
    """Block `index`'s params out of the stacked tree (index may be traced)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked)


class FusedDecoderBlock(DecoderBlock):
    """A decoder layer with, when its slot is >= 0, cross-attention block `slot` before it.
    Same params as DecoderBlock: an imported LLM's layers load unchanged."""

    def __call__(self, x: jax.Array, layer, slot: jax.Array, positions: jax.Array, mask,
                 cross: CrossInputs):
        def fuse(x):
            block = CrossAttentionBlock(self.config, parent=None)  # applied, not a submodule
            params = {"params": block_params(cross.params, jnp.maximum(slot, 0))}
            return block.apply(params, x, cross.images, cross.mask, cross.rows)[0]

        x = jax.lax.cond(slot >= 0, fuse, lambda x: x, x)
        return super().__call__(x, layer, positions, mask)


class FusedDecoder(Decoder):
    """The decoder with cross-attention blocks before the layers in `cross_attention_layers`."""
    cross_attention_layers: tuple[int, ...] = ()

    def make_blocks(self) -> nn.Module:
        cfg = self.config
        return layers.stack_layers(FusedDecoderBlock, cfg.num_layers, cfg.remat_policy,
                                   in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
                                   unroll=cfg.scan_unroll)(cfg, name="layers")

    def run_blocks(self, x, specs, positions, attention_mask, cross=None):
        if cross is None:
            raise ValueError("a cross-attention-fusion decoder runs with the image inputs "
                             "(CrossInputs); got none")
        slots = block_slots(self.cross_attention_layers, self.config.num_layers)
        x, _ = self.blocks(x, specs, jnp.asarray(slots), positions, attention_mask, cross)
        return x


def block_slots(cross_attention_layers: tuple[int, ...], num_layers: int) -> np.ndarray:
    """i32[num_layers]: which cross-attention block runs before each layer (-1: none)."""
    slots = np.full((num_layers,), -1, np.int32)
    slots[list(cross_attention_layers)] = np.arange(len(cross_attention_layers), dtype=np.int32)
    return slots
