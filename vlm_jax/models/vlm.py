"""The VLM: SigLIP vision tower -> projector -> decoder LLM, with image tokens spliced into the text.

Param tree (each part optional, paths are stable: checkpoints and converters rely on them):

    vision_tower/   SigLIP ViT                          (models/siglip.py)
    text_tower/     SigLIP text transformer             (contrastive phase only)
    contrastive/    logit_scale, logit_bias             (contrastive phase only)
    projector/      vision width -> LLM width           (models/projector.py)
    llm/            Llama / Qwen2 / Gemma decoder       (models/decoder.py)

    cross_attention/ gated cross-attention blocks      (fusion="cross_attention" only)
    itm_head/        image-text matching logit         (itm_head=True only)

Early fusion (`fusion="early"`): the text holds `tokens_per_image` copies of the image token per
image (what HF's LlavaProcessor expands `<image>` to); the k-th image-token position of a row
receives the k-th image feature of that row, so images may sit anywhere in the text, several per
example. Cross-attention fusion (`fusion="cross_attention"`, models/cross_attention.py): the text
holds one image token per image, a marker, and the text attends to the image features through
gated blocks before the decoder layers in `cross_attention_layers`.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import ConfigError
from vlm_jax.models import layers
from vlm_jax.models.cross_attention import (FUSIONS, CrossInputs, FusedDecoder,
                                            cross_attention_stack, image_visibility)
from vlm_jax.models.decoder import Decoder, DecoderConfig
from vlm_jax.models.projector import Projector, ProjectorConfig, num_output_tokens
from vlm_jax.models.siglip import SiglipTextTower, SiglipVisionTower, TextTowerConfig, VisionConfig

COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat_policy", "scan_unroll")
# How a model computes, not what it holds: chosen by the command that runs it (train config,
# `--dtype` on generate / eval), never stored in a model directory. param_dtype is a fact of the
# saved weights and stays.
RUN_SETTINGS = ("dtype", "attention_backend", "remat_policy", "scan_unroll")
TOWERS = ("vision", "text_tower", "projector", "llm")
FEATURE_SELECT = ("full", "default")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig | None = None
    text_tower: TextTowerConfig | None = None
    projector: ProjectorConfig | None = None
    llm: DecoderConfig | None = None
    image_token_id: int = -1
    # HF LLaVA's vision_feature_select_strategy: "full" keeps every patch token (SigLIP has no
    # CLS token); "default" drops the first token (CLIP's CLS), kept for faithful imports.
    vision_feature_select: str = "full"
    # How the LLM reads the image: "early" (its features in the text) or "cross_attention"
    # (gated cross-attention blocks before the decoder layers listed in cross_attention_layers).
    fusion: str = "early"
    cross_attention_layers: tuple[int, ...] = ()
    # Image-text matching (BLIP): a logit "does this caption describe this image" read by a
    # Dense layer from the LLM's hidden state at the caption's last token (`itm_logits`).
    itm_head: bool = False
    # Compute settings applied to every tower when set (None keeps each tower's own).
    dtype: str | None = None
    param_dtype: str | None = None
    attention_backend: str | None = None
    remat_policy: str | None = None
    scan_unroll: int | None = None

    def __post_init__(self):
        if self.vision_feature_select not in FEATURE_SELECT:
            raise ConfigError(f"model.vision_feature_select={self.vision_feature_select!r}; "
                              f"supported: {FEATURE_SELECT}")
        if self.projector is not None and (self.vision is None or self.llm is None):
            raise ConfigError("model.projector needs both model.vision and model.llm")
        if self.vision is not None and self.llm is not None:
            if self.projector is None:
                raise ConfigError("model.vision and model.llm are set but model.projector is not")
            if not 0 <= self.image_token_id < self.llm.vocab_size:
                raise ConfigError(f"model.image_token_id={self.image_token_id} must be a token of "
                                  f"the LLM vocabulary [0, {self.llm.vocab_size})")
        self._check_fusion()
        if self.itm_head and (self.vision is None or self.llm is None):
            raise ConfigError("model.itm_head=True needs model.vision, model.projector and "
                              "model.llm (the LLM reads image + caption)")

    def _check_fusion(self):
        if self.fusion not in FUSIONS:
            raise ConfigError(f"model.fusion={self.fusion!r}; supported: {FUSIONS}")
        object.__setattr__(self, "cross_attention_layers",
                           tuple(int(i) for i in self.cross_attention_layers))
        chosen = self.cross_attention_layers
        if self.fusion == "early":
            if chosen:
                raise ConfigError(f"model.cross_attention_layers={chosen} is set but "
                                  f"model.fusion='early' (set fusion='cross_attention')")
            return
        if self.vision is None or self.llm is None:
            raise ConfigError("model.fusion='cross_attention' needs model.vision, "
                              "model.projector and model.llm")
        if not chosen:
            raise ConfigError("model.fusion='cross_attention' needs model.cross_attention_layers: "
                              "the decoder layers a cross-attention block runs before, e.g. "
                              "(0, 4, 8) for every 4th of 12")
        if list(chosen) != sorted(set(chosen)) or not all(0 <= i < self.llm.num_layers
                                                        for i in chosen):
            raise ConfigError(f"model.cross_attention_layers={chosen} must be increasing layer "
                              f"indices in [0, {self.llm.num_layers}) (model.llm.num_layers)")

    @property
    def features_per_image(self) -> int:
        """Image features the LLM reads per image (vision patches after the projector)."""
        patches = self.vision.num_patches - (1 if self.vision_feature_select == "default" else 0)
        return num_output_tokens(self.projector, patches)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the text holds per image: the features themselves (early fusion) or one
        marker (cross-attention fusion)."""
        return 1 if self.fusion == "cross_attention" else self.features_per_image

    def resolved(self, part: str):
        """Sub-config `part` with the global compute overrides applied."""
        sub = getattr(self, part)
        overrides = {f: getattr(self, f) for f in COMPUTE_FIELDS
                     if getattr(self, f) is not None and hasattr(sub, f)}
        return dataclasses.replace(sub, **overrides) if overrides else sub


def architecture_only(config: VLMConfig) -> VLMConfig:
    """`config` with every run setting (RUN_SETTINGS) back at its default in every tower: f32
    compute, automatic attention backend, no remat. What a model directory records."""
    towers = {}
    for part in TOWERS:
        sub = getattr(config, part)
        if sub is None:
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(sub) if f.name in RUN_SETTINGS}
        towers[part] = dataclasses.replace(sub, **defaults) if defaults else sub
    return dataclasses.replace(config, **towers, **{name: None for name in RUN_SETTINGS})


def run_settings(config: VLMConfig) -> dict:
    """The non-default run settings of `config` ({"dtype": "bfloat16", "llm.remat_policy": ...}),
    to record what a model was trained with."""
    out = {name: getattr(config, name) for name in RUN_SETTINGS if getattr(config, name)}
    bare = architecture_only(config)
    for part in TOWERS:
        sub, default = getattr(config, part), getattr(bare, part)
        for name in RUN_SETTINGS:
            if sub is not None and hasattr(sub, name) and getattr(sub, name) != getattr(default, name):
                out[f"{part}.{name}"] = getattr(sub, name)
    return out


def with_run_settings(config: VLMConfig, dtype: str | None = None,
                      attention_backend: str | None = None,
                      remat_policy: str | None = None) -> VLMConfig:
    """`config` computing as asked (None keeps what it has); validated like a config field."""
    asked = {k: v for k, v in dict(dtype=dtype, attention_backend=attention_backend,
                                   remat_policy=remat_policy).items() if v is not None}
    updated = dataclasses.replace(config, **asked)
    for part in TOWERS:  # replace() runs each tower's checks, which name the bad field
        if getattr(updated, part) is not None:
            updated.resolved(part)
    return updated


class ContrastiveHead(nn.Module):
    """SigLIP's learned temperature and bias (HF init: log(10) and -10)."""

    @nn.compact
    def __call__(self):
        scale = layers.sharded_param(self, "logit_scale", nn.initializers.constant(np.log(10.0)),
                                     (1,), ("norm",), jnp.float32)
        bias = layers.sharded_param(self, "logit_bias", nn.initializers.constant(-10.0), (1,),
                                    ("norm",), jnp.float32)
        return scale, bias


class VLM(nn.Module):
    config: VLMConfig

    def setup(self):
        cfg = self.config
        if cfg.vision is not None:
            self.vision_tower = SiglipVisionTower(cfg.resolved("vision"))
        if cfg.text_tower is not None:
            self.text_tower = SiglipTextTower(cfg.resolved("text_tower"))
            self.contrastive = ContrastiveHead()
        if cfg.projector is not None:
            self.projector = Projector(cfg.resolved("projector"), out_dim=cfg.llm.hidden_size)
        if cfg.llm is not None and cfg.fusion == "cross_attention":
            self.llm = FusedDecoder(cfg.resolved("llm"), cfg.cross_attention_layers)
            self.cross_attention = cross_attention_stack(
                cfg.resolved("llm"), len(cfg.cross_attention_layers), name="cross_attention")
        elif cfg.llm is not None:
            self.llm = Decoder(cfg.resolved("llm"))
        if cfg.itm_head:
            llm = cfg.resolved("llm")
            self.itm = layers.Dense((llm.hidden_size,), (1,), ("embed", None), use_bias=True,
                                    dtype=jnp.dtype(llm.dtype), param_dtype=jnp.dtype(llm.param_dtype),
                                    name="itm_head")

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images: f32[B, M, H, W, 3] -> LLM-space image tokens f32[B, M * features_per_image, D]."""
        b, m = images.shape[:2]
        tokens = self.vision_tower(images.reshape((b * m,) + images.shape[2:]))  # [B*M, N, Dv]
        if self.config.vision_feature_select == "default":
            tokens = tokens[:, 1:]
        tokens = self.projector(tokens)  # [B*M, N', D]
        return tokens.reshape(b, m * tokens.shape[1], tokens.shape[2])

    def embed(self, input_ids: jax.Array, images: jax.Array | None) -> jax.Array:
        """Token embeddings with image features written into the image-token positions."""
        embeds = self.llm.embed(input_ids)  # [B, T, D]
        if images is None or images.shape[1] == 0 or self.config.fusion == "cross_attention":
            return embeds
        return self.splice(embeds, input_ids, self.encode_images(images))

    def splice(self, embeds: jax.Array, input_ids: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """embeds [B, T, D] with image_tokens [B, M*n, D] written into the image-token positions."""
        image_tokens = image_tokens.astype(embeds.dtype)
        is_image = input_ids == self.config.image_token_id
        # k-th image-token position of a row <- k-th image feature of that row
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
        gathered = jnp.take_along_axis(image_tokens, index[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)

    def __call__(self, input_ids: jax.Array, images: jax.Array | None, positions: jax.Array,
                 mask_ar: jax.Array, segment_ids: jax.Array | None = None,
                 return_hidden: bool = False):
        """Logits f32[B, T, V] for a batch in the data pipeline's layout (see vlm_jax/data)."""
        embeds = layers.constrain(self.embed(input_ids, images))
        mask = layers.attention_mask_for(self.config.resolved("llm").attention_backend,
                                         mask_ar, segment_ids)
        cross = self.cross_inputs(embeds, input_ids, images, segment_ids)
        return self.llm(embeds, positions, mask, return_hidden=return_hidden, cross=cross)

    def hidden_states(self, input_ids: jax.Array, images: jax.Array | None, positions: jax.Array,
                      mask_ar: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """The LLM's final-normed hidden states [B, T, D] (what `__call__` turns into logits)."""
        embeds = layers.constrain(self.embed(input_ids, images))
        mask = layers.attention_mask_for(self.config.resolved("llm").attention_backend,
                                         mask_ar, segment_ids)
        cross = self.cross_inputs(embeds, input_ids, images, segment_ids)
        return self.llm.hidden_states(embeds, positions, mask, cross)

    def cross_inputs(self, embeds: jax.Array, input_ids: jax.Array, images: jax.Array | None,
                     segment_ids: jax.Array | None = None) -> CrossInputs | None:
        """What the cross-attention blocks read (None under early fusion): the encoded images,
        which text token sees which (models/cross_attention.py) and the blocks' params."""
        if self.config.fusion != "cross_attention":
            return None
        image_tokens = None
        if images is not None and images.shape[1] > 0:
            image_tokens = self.encode_images(images)
        return self.cross_inputs_from(embeds, input_ids, image_tokens, segment_ids)

    def cross_inputs_from(self, embeds: jax.Array, input_ids: jax.Array,
                          image_tokens: jax.Array | None,
                          segment_ids: jax.Array | None = None) -> CrossInputs:
        """`cross_inputs` from encoded images [B, M*n, D] (None: text alone)."""
        cfg = self.config
        if image_tokens is None:
            # Text alone: one zero image token that no query sees (every block adds exactly 0).
            batch, length = input_ids.shape
            image_tokens = jnp.zeros((batch, 1, embeds.shape[-1]), embeds.dtype)
            mask = jnp.zeros((batch, 1, length, 1), bool)
            rows = jnp.zeros((batch, length, 1), bool)
        else:
            # laid out like every activation (batch-sharded): left to propagation, the shapes
            # recipe's instruct step on a data=4 x fsdp=2 mesh took the k / v kernels' layout back
            # into the projector and replicated its output ("involuntary full rematerialization")
            image_tokens = layers.constrain(image_tokens.astype(embeds.dtype))
            mask, rows = image_visibility(input_ids, cfg.image_token_id,
                                          image_tokens.shape[1] // cfg.features_per_image,
                                          cfg.features_per_image, segment_ids)
        if self.is_initializing():
            self.cross_attention(embeds, image_tokens, mask, rows)  # creates the blocks' params
        params = nn.unbox(self.variables["params"]["cross_attention"])
        return CrossInputs(params, image_tokens, mask, rows)

    def itm_logits(self, input_ids: jax.Array, images: jax.Array, last_index: jax.Array,
                   image_index: jax.Array) -> jax.Array:
        """Image-text matching logits f32[R] of R (image, caption) pairs.

        images: f32[N, H, W, 3], each encoded once; image_index: i32[R], the image of pair r;
        input_ids: i32[R, T], pair r's text with one image's placeholder (`tokens_per_image`
        image tokens, causal attention); last_index: i32[R], the position whose final hidden
        state the head reads (the caption's last token, which has seen everything before it)."""
        features = self.encode_images(images[:, None])[image_index]  # [R, n, D]
        embeds = self.llm.embed(input_ids)
        cross = None
        if self.config.fusion == "cross_attention":
            cross = self.cross_inputs_from(embeds, input_ids, features)
        else:
            embeds = self.splice(embeds, input_ids, features)
        rows, length = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
        mask = layers.attention_mask_for(self.config.resolved("llm").attention_backend,
                                         jnp.ones((rows, length), jnp.int32), None)
        hidden = self.llm.hidden_states(layers.constrain(embeds), positions, mask, cross)
        last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]  # [R, D]
        return self.itm(last)[:, 0].astype(jnp.float32)

    def contrastive_embeddings(self, images: jax.Array, text_ids: jax.Array):
        """SigLIP: L2-normalised image and text embeddings f32[B, P] plus (logit_scale, logit_bias)."""
        zimg = self.vision_tower.pool(images)
        ztxt = self.text_tower(text_ids)
        zimg = zimg / jnp.linalg.norm(zimg, axis=-1, keepdims=True)
        ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
        return zimg, ztxt, self.contrastive()

    def init_all(self, input_ids, images, positions, mask_ar, text_ids=None, image_size=None):
        """Touches every part so `init` creates all params (use with `method=VLM.init_all`)."""
        out = {}
        if self.config.llm is not None:
            out["logits"] = self(input_ids, images if self.config.vision is not None else None,
                                 positions, mask_ar)
        if self.config.itm_head:
            out["itm"] = self.itm_logits(input_ids, images[:, 0], jnp.zeros(len(input_ids), jnp.int32),
                                         jnp.arange(len(input_ids)))
        if self.config.text_tower is not None:
            out["contrastive"] = self.contrastive_embeddings(images[:, 0], text_ids)
        elif self.config.vision is not None and self.config.vision.use_head:
            out["pooled"] = self.vision_tower.pool(images[:, 0])
        return out


def dummy_inputs(config: VLMConfig, batch_size: int = 1, seq_len: int | None = None) -> dict:
    """Smallest inputs that exercise every part of `config` (for init / eval_shape)."""
    n_tok = config.tokens_per_image if config.vision is not None and config.llm is not None else 0
    seq_len = seq_len or n_tok + 4
    inputs = {"input_ids": jnp.zeros((batch_size, seq_len), jnp.int32),
              "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)),
              "mask_ar": jnp.ones((batch_size, seq_len), jnp.int32), "images": None}
    if config.vision is not None:
        size = config.vision.image_size
        inputs["images"] = jnp.zeros((batch_size, 1, size, size, 3), jnp.float32)
        if n_tok:
            inputs["input_ids"] = inputs["input_ids"].at[:, :n_tok].set(config.image_token_id)
    if config.text_tower is not None:
        inputs["text_ids"] = jnp.zeros((batch_size, config.text_tower.max_len), jnp.int32)
    return inputs


def init_params(config: VLMConfig, rng: jax.Array, boxed: bool = False):
    """Fresh params for `config` (boxed=True keeps nn.LogicallyPartitioned for sharding)."""
    params = VLM(config).init(rng, **dummy_inputs(config), method=VLM.init_all)["params"]
    return params if boxed else nn.unbox(params)


@functools.lru_cache(maxsize=32)
def param_shapes(config: VLMConfig) -> dict:
    """The jax.ShapeDtypeStruct tree of `init_params(config, ...)`, traced once per config
    (tracing the init costs about half a second; loads, imports and plans ask for it often).
    Shared between callers: build new trees from it, never edit it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def itm_inputs(config: VLMConfig, text_ids: jax.Array, text_lengths: jax.Array):
    """The LLM's view of captions for matching (`VLM.itm_logits`): (ids i32[B, n + L] = one
    image's placeholder, then the caption ids as the contrastive pipeline pads them; last_index
    i32[B] = the caption's last real token)."""
    n = config.tokens_per_image
    image = jnp.full((text_ids.shape[0], n), config.image_token_id, text_ids.dtype)
    return (jnp.concatenate([image, jnp.asarray(text_ids)], axis=1),
            n + jnp.maximum(jnp.asarray(text_lengths), 1) - 1)


def check_image_placeholders(input_ids: np.ndarray, num_images: np.ndarray | int,
                             image_token_id: int, tokens_per_image: int) -> None:
    """Raise if a row's image-token count differs from num_images * tokens_per_image."""
    counts = (np.asarray(input_ids) == image_token_id).sum(axis=-1)
    want = np.broadcast_to(np.asarray(num_images) * tokens_per_image, counts.shape)
    bad = np.nonzero(counts != want)[0]
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"row {row} has {int(counts[row])} image tokens (id {image_token_id}) but "
            f"{int(want[row]) // tokens_per_image} image(s) x {tokens_per_image} tokens per image = "
            f"{int(want[row])} were expected: the text's image placeholders and the images "
            f"do not match")
