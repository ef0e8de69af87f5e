"""HF `Idefics3ForConditionalGeneration` (Idefics3 / SmolVLM) <-> our VLM config and params.

What an Idefics3 model computes, and what it is here:

    model.vision_model            Idefics3VisionTransformer: SigLIP's encoder (same blocks, Conv2d
                                  patch embedding with bias, learned position table, no pooling
                                  head), read at its last layer AFTER its post_layernorm
        -> our SiglipVisionTower (feature_layer=-1, feature_post_norm=True, use_head=False,
           posemb="learn"), tensor names as SigLIP's below `model.vision_model.`
    model.connector               pixel shuffle by `scale_factor` (channels ordered (row, col,
                                  channel) in each s x s block: exactly our `pixel_shuffle`),
                                  then `modality_projection.proj`, a Linear without bias
        -> ProjectorConfig(type="pixel_shuffle", pixel_shuffle_factor=scale_factor, mlp_depth=1,
           bias=False, input_norm=False, pos_embed=False)
    model.text_model, lm_head     a Llama decoder (families/llama.py), its own lm_head
    image_token_id                the id the processor repeats `image_seq_len` times per image

Each tensor is a transpose / reshape: HF -> import -> export -> HF reproduces every f32 tensor
bit for bit.

Not expressible (refused naming the field): a vision grid whose HF position ids are not
0..N-1 (Idefics3 buckets fractional patch coordinates in float32; for some grid sides, e.g. 19
or 25 patches, rounding maps two patches onto one table row), a text model other than Llama.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import hf_llm, hf_siglip
from vlm_jax.convert.hf_io import check_keys
from vlm_jax.errors import ConversionError
from vlm_jax.models.projector import ProjectorConfig, num_output_tokens
from vlm_jax.models.vlm import VLM, VLMConfig

ARCHITECTURE = "Idefics3ForConditionalGeneration"
MODEL_TYPE = "idefics3"
VISION_MODEL_TYPE = "idefics3_vision"
VISION_PREFIX = "model.vision_model."
PROJ_KEY = "model.connector.modality_projection.proj.weight"
LLM_PREFIX = "model.text_model."
LM_HEAD_KEY = "lm_head.weight"
TEXT_FAMILIES = ("llama",)


# ----------------------------------------------------------------------------- configs

@functools.lru_cache(maxsize=64)
def position_ids_are_identity(image_size: int, patch_size: int) -> bool:
    """Whether Idefics3VisionEmbeddings gives a full (unpadded) image the position ids 0..N-1.
    Asks transformers' own class (it buckets float32 coordinates, which for some grid sides
    rounds two patches onto one table row)."""
    import torch
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    side = image_size // patch_size
    embeddings = Idefics3VisionEmbeddings(Idefics3VisionConfig(
        hidden_size=1, image_size=image_size, patch_size=patch_size))
    seen = {}
    embeddings.position_embedding.register_forward_pre_hook(
        lambda module, args: seen.setdefault("ids", args[0]))
    with torch.no_grad():
        embeddings(torch.zeros(1, 3, side * patch_size, side * patch_size),
                   torch.ones(1, side, side, dtype=torch.bool))
    return bool(torch.equal(seen["ids"][0], torch.arange(side * side)))


def config_from_hf(hf: dict) -> VLMConfig:
    """VLMConfig for an Idefics3 config.json dict; what we cannot express raises naming the field."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"model_type={hf.get('model_type')!r}: expected {MODEL_TYPE!r}")
    vision_hf = dict(hf.get("vision_config") or {})
    kind = vision_hf.get("model_type", VISION_MODEL_TYPE)
    if kind != VISION_MODEL_TYPE:
        raise ConversionError(f"vision_config.model_type={kind!r}: expected {VISION_MODEL_TYPE!r}")
    vision = hf_siglip.vision_config_from_hf(
        {**vision_hf, "model_type": "siglip_vision_model", "vision_use_head": False},
        feature_layer=-1, feature_post_norm=True, posemb="learn")
    if not position_ids_are_identity(vision.image_size, vision.patch_size):
        raise ConversionError(
            f"vision_config.image_size={vision.image_size} / patch_size={vision.patch_size}: "
            f"transformers' Idefics3 vision embeddings give this {vision.image_size // vision.patch_size}"
            f"-patch grid position ids other than 0..N-1 (float32 bucketing), which our vision "
            f"tower cannot express")
    text_hf = dict(hf.get("text_config") or {})
    family = text_hf.get("model_type", "llama")
    if family not in TEXT_FAMILIES:
        raise ConversionError(f"text_config.model_type={family!r}: an Idefics3 import supports "
                              f"{TEXT_FAMILIES} text models only")
    text_hf.setdefault("model_type", "llama")
    if "tie_word_embeddings" in hf:  # the top-level flag is the one Idefics3 honours
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm = hf_llm.decoder_config_from_hf(text_hf)
    scale = hf.get("scale_factor", 2)
    if not isinstance(scale, int) or scale < 1:
        raise ConversionError(f"scale_factor={scale!r}: expected a positive int")
    projector = ProjectorConfig(type="pixel_shuffle", pixel_shuffle_factor=scale, mlp_depth=1,
                                bias=False, input_norm=False, pos_embed=False)
    try:
        num_output_tokens(projector, vision.num_patches)
    except ValueError as e:
        raise ConversionError(f"scale_factor={scale}: {e}") from None
    if "image_token_id" not in hf:
        raise ConversionError("image_token_id is missing from the Idefics3 config")
    return VLMConfig(vision=vision, projector=projector, llm=llm,
                     image_token_id=int(hf["image_token_id"]), vision_feature_select="full")


def blocker(config: VLMConfig) -> str | None:
    """Why HF Idefics3 cannot hold this model (naming the field), or None when it can."""
    proj, vision, llm = config.projector, config.vision, config.llm
    if proj.type != "pixel_shuffle":
        return (f"model.projector.type={proj.type!r} cannot be exported to HF Idefics3, whose "
                f"connector is a pixel shuffle then one Linear ('pixel_shuffle', mlp_depth=1)")
    checks = (
        (proj.mlp_depth != 1, f"model.projector.mlp_depth={proj.mlp_depth}", "one Linear after the "
         "pixel shuffle (mlp_depth=1)"),
        (proj.bias, "model.projector.bias=True", "a Linear without bias"),
        (proj.input_norm, "model.projector.input_norm=True", "no LayerNorm in its connector"),
        (proj.pos_embed, "model.projector.pos_embed=True", "no position embedding in its connector"),
        (vision.feature_layer % (vision.depth + 1) != vision.depth,
         f"model.vision.feature_layer={vision.feature_layer}", "the vision model's last layer"),
        (not vision.feature_post_norm, "model.vision.feature_post_norm=False", "its connector "
         "reading the vision features after post_layernorm (feature_post_norm=True)"),
        (vision.use_head, "model.vision.use_head=True", "no pooling head in its vision model"),
        (config.vision_feature_select != "full",
         f"model.vision_feature_select={config.vision_feature_select!r}", "every patch token ('full')"),
        (llm.family not in TEXT_FAMILIES, f"model.llm.family={llm.family!r}",
         f"a {'/'.join(TEXT_FAMILIES)} text model here"),
        (bool(llm.final_logit_softcap), f"model.llm.final_logit_softcap={llm.final_logit_softcap}",
         "no final-logit soft-cap"),
    )
    for failed, field, needs in checks:
        if failed:
            return f"{field} cannot be exported to HF Idefics3, which has {needs}"
    if not position_ids_are_identity(vision.image_size, vision.patch_size):
        return (f"model.vision.image_size={vision.image_size} (patch_size={vision.patch_size}) cannot "
                f"be exported to HF Idefics3: its vision embeddings give this grid position ids "
                f"other than 0..N-1")
    return None


def config_to_hf(config: VLMConfig) -> dict:
    """config.json dict for Idefics3ForConditionalGeneration; refuses what it cannot hold."""
    why = blocker(config)
    if why is not None:
        raise ConversionError(why)
    v = config.vision
    text = hf_llm.decoder_config_to_hf(config.llm)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vision_config": dict(model_type=VISION_MODEL_TYPE, hidden_size=v.width,
                              intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                              num_attention_heads=v.num_heads, num_channels=3,
                              image_size=v.image_size, patch_size=v.patch_size,
                              hidden_act=hf_siglip.SUPPORTED_ACT, layer_norm_eps=v.layer_norm_eps,
                              attention_dropout=0.0),
        "text_config": text,
        "image_token_id": config.image_token_id,
        "scale_factor": config.projector.pixel_shuffle_factor,
        "tie_word_embeddings": config.llm.tie_embeddings,
    }


# ----------------------------------------------------------------------------- weights

def params_from_hf(sd: dict, config: VLMConfig) -> dict:
    """Our param tree from an Idefics3 state dict; refuses missing, unexpected or mis-shaped
    tensors."""
    d_in = config.vision.width * config.projector.pixel_shuffle_factor ** 2
    d_out = config.llm.hidden_size
    vision = hf_siglip.vision_params_from_hf(sd, config.vision, prefix=VISION_PREFIX)
    if PROJ_KEY not in sd:
        raise ConversionError(f"HF tensor {PROJ_KEY!r} is missing from the state dict")
    weight = np.asarray(sd[PROJ_KEY])
    if weight.shape != (d_out, d_in):
        raise ConversionError(f"HF tensor {PROJ_KEY!r} has shape {weight.shape}, expected "
                              f"{(d_out, d_in)} (text hidden_size, vision hidden_size x "
                              f"scale_factor^2)")
    projector = {"mlp": {"linear_1": {"kernel": np.ascontiguousarray(weight.T)}}}
    params = {
        "vision_tower": vision,
        "projector": projector,
        "llm": hf_llm.decoder_params_from_hf(sd, config.llm, prefix=LLM_PREFIX,
                                             lm_head_key=LM_HEAD_KEY),
    }
    expected = set(params_to_hf(params, config))
    if config.llm.tie_embeddings and LM_HEAD_KEY in sd:
        expected.add(LM_HEAD_KEY)  # a tied model may carry the (identical) head: checked above
    check_keys({k: v for k, v in sd.items() if not k.endswith(hf_llm.IGNORED_SUFFIXES)},
               expected, "HF Idefics3 checkpoint")
    return params


def params_to_hf(params: dict, config: VLMConfig) -> dict:
    """HF Idefics3 state dict, with the names save_pretrained writes."""
    sd = hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix=VISION_PREFIX)
    kernel = np.asarray(params["projector"]["mlp"]["linear_1"]["kernel"], np.float32)
    sd[PROJ_KEY] = np.ascontiguousarray(kernel.T)
    sd.update(hf_llm.decoder_params_to_hf(params["llm"], config.llm, prefix=LLM_PREFIX,
                                          lm_head_key=LM_HEAD_KEY))
    return sd


# ----------------------------------------------------------------------------- inputs

def pixel_values_for_hf(pixel_values: np.ndarray, images_per_row: list[int]) -> tuple:
    """Our f32[num_images, 3, H, W] (batch order) -> Idefics3's f32[B, max_images, 3, H, W]
    (rows padded with all-zero images, which Idefics3 drops) and pixel_attention_mask
    bool[B, max_images, H, W] (all ones: single-tile, unpadded images)."""
    n, c, h, w = pixel_values.shape
    m = max(images_per_row) if images_per_row else 0
    out = np.zeros((len(images_per_row), m, c, h, w), np.float32)
    mask = np.ones((len(images_per_row), m, h, w), bool)
    start = 0
    for row, count in enumerate(images_per_row):
        out[row, :count] = pixel_values[start:start + count]
        start += count
    if start != n:
        raise ConversionError(f"{n} images for rows holding {start}")
    return out, mask


def probe_logits(hf_model, config: VLMConfig, params_exact, params_f32):
    """A loaded Idefics3ForConditionalGeneration (f32, eager attention) and our model on one
    probe row: 4 text tokens, one single-tile image ([1, 1, 3, S, S], pixel
    mask all ones), 8 more text tokens. -> (ours on `params_exact`, ours on
    `params_f32`, theirs), logits f32[1, T, V]."""
    import torch

    rng = np.random.default_rng(0)
    text = [int(t) for t in rng.integers(0, config.llm.vocab_size, 24) if t != config.image_token_id]
    ids = np.array([text[:4] + [config.image_token_id] * config.tokens_per_image + text[4:12]])
    size = config.vision.image_size
    pixels = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    hf_pixels, pixel_mask = pixel_values_for_hf(pixels, [1])
    with torch.no_grad():
        theirs = hf_model.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(hf_pixels),
                                 pixel_attention_mask=torch.tensor(pixel_mask)).logits.numpy()
    t = ids.shape[1]
    model = VLM(config)
    forward = jax.jit(lambda p: model.apply(
        {"params": p}, jnp.asarray(ids, jnp.int32),
        jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None],
        jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32)))
    ours_exact = np.asarray(forward(params_exact))
    ours_f32 = ours_exact if params_f32 is params_exact else np.asarray(forward(params_f32))
    return ours_exact, ours_f32, theirs
