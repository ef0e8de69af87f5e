"""HF `LlavaForConditionalGeneration` (SigLIP vision tower) <-> our VLM config and params.

Key layout of transformers 5.x LLaVA models in memory (what we convert to and from):
    model.vision_tower.*            SigLIP vision transformer (no `vision_model.` level)
    model.multi_modal_projector.*   linear_1 -> act -> linear_2 (both with bias by default)
    model.language_model.*          the decoder without its head
    lm_head.weight                  absent when embeddings are tied
On disk, transformers (4.x and 5.x `save_pretrained` alike) writes the legacy names
`vision_tower.[vision_model.]*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`; `normalize_keys` maps either spelling onto the in-memory one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vlm_jax.convert import hf_llm, hf_siglip
from vlm_jax.convert.hf_io import check_keys
from vlm_jax.errors import ConversionError
from vlm_jax.models import families
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import VLMConfig

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
LLM_PREFIX = "model.language_model."
LM_HEAD_KEY = "lm_head.weight"

# HF activation names -> ours (projector_hidden_act)
HF_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "silu": "silu", "relu": "relu"}
OUR_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}


_LEGACY_PREFIXES = (  # (on-disk prefix, in-memory prefix), most specific first
    ("language_model.model.", LLM_PREFIX),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", VISION_PREFIX),
    ("vision_tower.", VISION_PREFIX),
    ("multi_modal_projector.", PROJECTOR_PREFIX),
)


def normalize_keys(sd: dict) -> dict:
    """Map legacy on-disk LLaVA tensor names onto the transformers 5.x in-memory names."""
    out = {}
    for key, value in sd.items():
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def config_from_hf(hf: dict) -> VLMConfig:
    """VLMConfig for a HF LLaVA config.json dict; unsupported fields raise naming the field."""
    if hf.get("model_type") != "llava":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: expected 'llava'")
    vision_hf = hf["vision_config"]
    if vision_hf.get("model_type") != "siglip_vision_model":
        raise ConversionError(f"vision_config.model_type={vision_hf.get('model_type')!r}: only SigLIP "
                              f"vision towers ('siglip_vision_model') are supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer={layer!r}: only a single layer index is supported "
                              f"(concatenating several layers is not)")
    act = hf.get("projector_hidden_act", "gelu")
    if act not in HF_ACTS:
        raise ConversionError(f"projector_hidden_act={act!r}; supported: {sorted(HF_ACTS)}")
    vision = dataclasses.replace(hf_siglip.vision_config_from_hf(vision_hf), feature_layer=layer)
    text_hf = dict(hf["text_config"])
    if "tie_word_embeddings" in hf:  # the top-level flag is the one LLaVA honours
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm = hf_llm.decoder_config_from_hf(text_hf)
    if llm.final_logit_softcap and not families.get(llm.family).llava_applies_final_softcap:
        # LlavaForConditionalGeneration applies its own lm_head to the text model's hidden states,
        # without the text config's final soft-cap: the import computes what that class computes.
        llm = dataclasses.replace(llm, final_logit_softcap=0.0)
    config = VLMConfig(
        vision=vision,
        projector=ProjectorConfig(type="mlp2x_gelu", act=HF_ACTS[act],
                                  bias=bool(hf.get("multimodal_projector_bias", True))),
        llm=llm,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", -1))),
        vision_feature_select=hf.get("vision_feature_select_strategy", "default"),
    )
    seq = hf.get("image_seq_length")
    if seq is not None and seq != config.tokens_per_image:
        raise ConversionError(f"image_seq_length={seq} but the vision tower and projector give "
                              f"{config.tokens_per_image} tokens per image")
    return config


def config_to_hf(config: VLMConfig) -> dict:
    """config.json dict for LlavaForConditionalGeneration (only the mlp2x projector is expressible)."""
    proj = config.projector
    if proj.type != "mlp2x_gelu":
        raise ConversionError(f"projector type {proj.type!r} cannot be expressed as a HF LLaVA projector "
                              f"(LLaVA has Linear -> act -> Linear only)")
    if config.vision.feature_post_norm:
        raise ConversionError("model.vision.feature_post_norm=True cannot be expressed in HF LLaVA, "
                              "which reads the vision hidden states before post_layernorm")
    family = families.get(config.llm.family)
    if config.llm.final_logit_softcap and not family.llava_applies_final_softcap:
        raise ConversionError(
            f"llm.final_logit_softcap={config.llm.final_logit_softcap}: transformers' LLaVA over a "
            f"{family.hf_model_type} text model does not apply the final-logit soft-cap, so it would "
            f"answer differently (export with --format custom, which keeps it)")
    text = hf_llm.decoder_config_to_hf(config.llm)
    vision = hf_siglip.vision_config_to_hf(config.vision)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": config.image_token_id,
        "image_seq_length": config.tokens_per_image,
        "projector_hidden_act": OUR_ACTS[proj.act],
        "multimodal_projector_bias": proj.bias,
        "vision_feature_layer": config.vision.feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select,
        "tie_word_embeddings": config.llm.tie_embeddings,
    }


def projector_params_from_hf(sd: dict, config: ProjectorConfig, prefix: str = PROJECTOR_PREFIX) -> dict:
    """HF Linear weights are [out, in]; our kernels are [in, out]."""
    params = {}
    for i in (1, 2):
        layer = {"kernel": np.asarray(sd[f"{prefix}linear_{i}.weight"]).T}
        if config.bias:
            layer["bias"] = np.asarray(sd[f"{prefix}linear_{i}.bias"])
        params[f"linear_{i}"] = layer
    return {"mlp": params}


def projector_params_to_hf(params: dict, config: ProjectorConfig, prefix: str = PROJECTOR_PREFIX) -> dict:
    sd = {}
    for i in (1, 2):
        layer = params["mlp"][f"linear_{i}"]
        sd[f"{prefix}linear_{i}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        if config.bias:
            sd[f"{prefix}linear_{i}.bias"] = np.asarray(layer["bias"])
    return sd


def params_from_hf(sd: dict, config: VLMConfig) -> dict:
    """Our param tree from a HF LLaVA state dict (either key spelling); refuses missing,
    unexpected or mis-shaped tensors."""
    sd = normalize_keys(sd)
    params = {
        "vision_tower": hf_siglip.vision_params_from_hf(sd, config.vision, prefix=VISION_PREFIX),
        "projector": projector_params_from_hf(sd, config.projector),
        "llm": hf_llm.decoder_params_from_hf(sd, config.llm, prefix=LLM_PREFIX,
                                             lm_head_key=LM_HEAD_KEY),
    }
    check_keys(sd, set(params_to_hf(params, config)), "HF LLaVA checkpoint")
    _check_projector_shapes(params["projector"], config)
    return params


def params_to_hf(params: dict, config: VLMConfig) -> dict:
    sd = {}
    sd.update(hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix=VISION_PREFIX))
    sd.update(projector_params_to_hf(params["projector"], config.projector))
    sd.update(hf_llm.decoder_params_to_hf(params["llm"], config.llm, prefix=LLM_PREFIX,
                                          lm_head_key=LM_HEAD_KEY))
    return sd


def _check_projector_shapes(params: dict, config: VLMConfig) -> None:
    want = {"linear_1": (config.vision.width, config.llm.hidden_size),
            "linear_2": (config.llm.hidden_size, config.llm.hidden_size)}
    for name, shape in want.items():
        got = params["mlp"][name]["kernel"].shape
        if got != shape:
            raise ConversionError(f"{PROJECTOR_PREFIX}{name}.weight: shape {got[::-1]} (out, in), "
                                  f"expected {shape[::-1]} from the vision and text configs")
