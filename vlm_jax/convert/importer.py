"""`vlm-jax import-hf`: HF checkpoint directories -> a vlm_jax model directory.

Accepted inputs:
  --hf-dir DIR                      a whole LlavaForConditionalGeneration (SigLIP vision tower),
                                    an Idefics3ForConditionalGeneration (Idefics3 / SmolVLM,
                                    hf_idefics3.py),
                                    a SiglipModel, a SiglipVisionModel, or a *ForCausalLM of
                                    any family in models/families/
  --vision DIR --text DIR           compose a SigLIP tower and an LLM with a fresh projector

A non-empty --out is refused unless --overwrite; the model directory is written whole or not at
all (`model_dir.save_model`), so an old one is replaced only by a complete new one.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from vlm_jax import model_dir
from vlm_jax.convert import (hf_custom, hf_idefics3, hf_io, hf_llava, hf_llm, hf_paligemma,
                             hf_siglip)
from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP, Tokenizer
from vlm_jax.errors import ConversionError
from vlm_jax.models import families
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import VLMConfig, init_params, param_shapes

LLM_TYPES = families.HF_MODEL_TYPES
SIGLIP_TYPES = ("siglip", "siglip_vision_model")
IMAGE_TOKEN = "<image>"


def _generation_config(directory: str | None) -> dict | None:
    """The LLM's HF generation_config.json (its stop tokens), kept so an export writes it back."""
    path = os.path.join(directory, "generation_config.json") if directory else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _find_tokenizer(directory: str):

    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.exists(os.path.join(directory, name)):
            return Tokenizer.from_path(directory)
    return None


def _vision_from_dir(directory: str, feature_layer: int | None):
    """(VisionConfig, params) from a SiglipModel or SiglipVisionModel directory."""
    hf = hf_io.read_config(directory)
    kind = hf.get("model_type")
    if kind not in SIGLIP_TYPES:
        raise ConversionError(f"{directory}: model_type={kind!r}; a vision tower must be one of {SIGLIP_TYPES}")
    sd = hf_io.read_state_dict(directory)
    vision_hf = hf["vision_config"] if kind == "siglip" else hf
    config = hf_siglip.vision_config_from_hf(vision_hf)
    if feature_layer is not None:
        config = dataclasses.replace(config, feature_layer=feature_layer)
    # SiglipModel and 4.x SiglipVisionModel files nest the tower under `vision_model.`;
    # transformers 5.x SiglipVisionModel writes it at the top level.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    params = hf_siglip.vision_params_from_hf(sd, config, prefix=prefix)
    if kind == "siglip_vision_model":
        expected = set(hf_siglip.vision_params_to_hf(params, config, prefix=prefix))
        hf_io.check_keys(sd, expected, f"{directory} (SiglipVisionModel)")
    return config, params


def _llm_from_dir(directory: str):
    hf = hf_io.read_config(directory)
    if hf.get("model_type") not in LLM_TYPES:
        raise ConversionError(f"{directory}: model_type={hf.get('model_type')!r}; an LLM must be one of "
                              f"{LLM_TYPES}")
    config = hf_llm.decoder_config_from_hf(hf)
    sd = hf_io.read_state_dict(directory)
    params = hf_llm.decoder_params_from_hf(sd, config, prefix="model.", lm_head_key="lm_head.weight")
    expected = set(hf_llm.decoder_params_to_hf(params, config, prefix="model.",
                                               lm_head_key="lm_head.weight"))
    hf_io.check_keys({k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")},
                     expected, f"{directory} ({hf['model_type']})")
    return config, params


def _set_idefics3_image_wrap(tokenizer, hf_dir: str) -> None:
    """Idefics3 / SmolVLM reads each (single-tile) image as <fake_token_around_image>
    <global-img> + image tokens + <fake_token_around_image>: its tokenizer writes images so."""
    missing = [t for t in ("<fake_token_around_image>", "<global-img>")
               if tokenizer.token_to_id(t) is None]
    if missing:
        raise ConversionError(f"{hf_dir}: the tokenizer lacks {missing}, the tokens Idefics3's "
                              f"processor writes around every image")
    tokenizer.image_wrap = IDEFICS3_IMAGE_WRAP


def _ensure_image_token(tokenizer, llm_config, llm_params, seed: int):
    """Add `<image>` to the tokenizer if absent, growing the embedding table when needed."""
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        (image_id,) = tokenizer.add_special_tokens([IMAGE_TOKEN])
    if image_id >= llm_config.vocab_size:
        llm_params, llm_config = hf_llm.resize_vocab(llm_params, llm_config, image_id + 1,
                                                     jax.random.key(seed))
    return image_id, llm_config, llm_params


def import_hf(out: str, hf_dir: str | None = None, vision_dir: str | None = None,
              text_dir: str | None = None, projector: str = "mlp2x_gelu",
              feature_layer: int | None = None, seed: int = 0,
              overwrite: bool = False) -> VLMConfig:
    """Convert HF weights into a model directory at `out`; returns its config. A non-empty `out`
    is refused unless `overwrite` (its contents are then replaced once the new model is whole)."""
    model_dir.check_output_dir(out, [d for d in (hf_dir, vision_dir, text_dir) if d], overwrite)
    tokenizer = None
    if hf_dir is not None:
        if vision_dir or text_dir:
            raise ConversionError("give either --hf-dir or --vision/--text, not both")
        hf = hf_io.read_config(hf_dir)
        kind = hf.get("model_type")
        tokenizer = _find_tokenizer(hf_dir)
        layouts = {"llava": hf_llava, "paligemma": hf_paligemma, hf_idefics3.MODEL_TYPE: hf_idefics3}
        if kind in layouts:  # LLaVA, PaliGemma, Idefics3 / SmolVLM
            layout = layouts[kind]
            config = layout.config_from_hf(hf)
            if feature_layer is not None:
                config = dataclasses.replace(
                    config, vision=dataclasses.replace(config.vision, feature_layer=feature_layer))
            params = layout.params_from_hf(hf_io.read_state_dict(hf_dir), config)
            if tokenizer is not None and tokenizer.token_to_id(IMAGE_TOKEN) not in (None, config.image_token_id):
                raise ConversionError(f"{hf_dir}: tokenizer maps {IMAGE_TOKEN} to "
                                      f"{tokenizer.token_to_id(IMAGE_TOKEN)} but config.json's "
                                      f"image token id is {config.image_token_id}")
            if kind == hf_idefics3.MODEL_TYPE and tokenizer is not None:
                _set_idefics3_image_wrap(tokenizer, hf_dir)
        elif kind == "vlm_jax":  # our own custom-format export, read back
            config = hf_custom.config_from_hf(hf)
            params = hf_custom.params_from_hf(hf_io.read_state_dict(hf_dir), config)
        elif kind == "siglip":
            sd = hf_io.read_state_dict(hf_dir)
            vision = hf_siglip.vision_config_from_hf(hf["vision_config"])
            text = hf_siglip.text_config_from_hf(hf["text_config"])
            config = VLMConfig(vision=vision, text_tower=text)
            params = {"vision_tower": hf_siglip.vision_params_from_hf(sd, vision, prefix="vision_model."),
                      "text_tower": hf_siglip.text_params_from_hf(sd, text, prefix="text_model."),
                      "contrastive": hf_siglip.contrastive_params_from_hf(sd)}
        elif kind == "siglip_vision_model":
            vision, vision_params = _vision_from_dir(hf_dir, feature_layer)
            config, params = VLMConfig(vision=vision), {"vision_tower": vision_params}
        elif kind in LLM_TYPES:
            llm, llm_params = _llm_from_dir(hf_dir)
            config, params = VLMConfig(llm=llm), {"llm": llm_params}
        else:
            raise ConversionError(f"{hf_dir}: model_type={kind!r} is not supported; supported: "
                                  f"llava, paligemma, idefics3, vlm_jax (our custom export), "
                                  f"{', '.join(SIGLIP_TYPES + LLM_TYPES)}")
    else:
        if not (vision_dir and text_dir):
            raise ConversionError("composing needs both --vision DIR and --text DIR (or use --hf-dir)")
        vision, vision_params = _vision_from_dir(vision_dir, -2 if feature_layer is None else feature_layer)
        llm, llm_params = _llm_from_dir(text_dir)
        tokenizer = _find_tokenizer(text_dir)
        if tokenizer is None:
            raise ConversionError(f"{text_dir}: no tokenizer.json or tokenizer.model next to the LLM")
        image_id, llm, llm_params = _ensure_image_token(tokenizer, llm, llm_params, seed)
        config = VLMConfig(vision=vision, projector=ProjectorConfig(type=projector), llm=llm,
                           image_token_id=image_id)
        # One compiled init (run op by op, each of its ops would compile on its own: seconds).
        fresh = jax.jit(lambda rng: init_params(config, rng))(jax.random.key(seed))
        params = {"vision_tower": vision_params, "projector": fresh["projector"], "llm": llm_params}
    params = _as_float32_like(params, config, seed)
    # PaliGemma reads "<image>...<bos>prefix\n" and attends bidirectionally over it: generate /
    # score / eval / a fine-tune repeat both (the "paligemma" template, prefix_lm).
    data = ({"prefix_lm": True, "template": "paligemma"}
            if hf_dir is not None and kind == "paligemma" else None)
    model_dir.save_model(out, config, params, tokenizer, data=data,
                         generation_config=_generation_config(hf_dir or text_dir))
    return config


def _as_float32_like(params: dict, config: VLMConfig, seed: int) -> dict:
    """Cast to the param dtype and check every tensor against the shapes our model expects."""
    expected = param_shapes(config)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    flat_got = dict(jax.tree_util.tree_leaves_with_path(params))
    missing = sorted(jax.tree_util.keystr(k) for k in set(flat_expected) - set(flat_got))
    extra = sorted(jax.tree_util.keystr(k) for k in set(flat_got) - set(flat_expected))
    if missing or extra:
        raise ConversionError(f"converted params do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    out = {}
    for path, want in flat_expected.items():
        value = np.asarray(flat_got[path])
        if value.shape != want.shape:
            raise ConversionError(f"param {jax.tree_util.keystr(path)}: shape {value.shape} from the "
                                  f"checkpoint, model expects {want.shape}")
        out[path] = value.astype(want.dtype)
    return jax.tree_util.tree_unflatten(jax.tree.structure(expected),
                                        [out[p] for p, _ in jax.tree_util.tree_leaves_with_path(expected)])
