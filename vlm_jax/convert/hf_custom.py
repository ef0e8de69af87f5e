"""Our VLM -> a self-contained transformers directory (remote code) for what HF LLaVA cannot hold.

Any projector (linear, mlp2x_gelu, pixel_shuffle with input_norm / pos_embed, resampler), any
decoder family, any vision feature layer. The directory carries its own code, copied from
`custom_hf/` (torch and transformers only), which config.json's `auto_map` points at:

    configuration_vlm_jax.VlmJaxConfig                 AutoConfig
    modeling_vlm_jax.VlmJaxForConditionalGeneration    AutoModelForImageTextToText
    processing_vlm_jax.VlmJaxProcessor                 AutoProcessor (processor_config.json,
                                                       written by hf_processor.py)

Tensor names (model.safetensors), HF Linear weights [out, in] as everywhere in convert/:
    vision_tower.*                 SiglipVisionModel (hf_siglip, no `vision_model.` level)
    projector.input_norm.*         projector/input_norm             (input_norm only)
    projector.pos_embed            projector/pos_embed  [N', Din]   (pos_embed only)
    projector.mlp.linear_{i}.*     projector/mlp/linear_{i}         (linear, mlp2x_gelu, pixel_shuffle)
    projector.media_proj.*, projector.queries, projector.ln_out.*,
    projector.blocks.{i}.{ln_latents,ln_media,q,k,v,o,ln_mlp,mlp.linear_{1,2}}.*
                                   projector/block_{i}/...          (resampler)
    language_model.model.*         the decoder (hf_llm)
    language_model.lm_head.weight  untied only
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import numpy as np

from vlm_jax.convert import hf_llava, hf_llm, hf_siglip
from vlm_jax.errors import ConversionError
from vlm_jax.models.vlm import VLMConfig

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_hf")
CODE_FILES = ("configuration_vlm_jax.py", "modeling_vlm_jax.py", "processing_vlm_jax.py")
ARCHITECTURE = "VlmJaxForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_vlm_jax.VlmJaxConfig",
            "AutoModelForImageTextToText": f"modeling_vlm_jax.{ARCHITECTURE}"}
PROCESSOR_CLASS = "VlmJaxProcessor"
PROCESSOR_AUTO_MAP = {"AutoProcessor": f"processing_vlm_jax.{PROCESSOR_CLASS}"}
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "projector."
LLM_PREFIX = "language_model.model."
LM_HEAD_KEY = "language_model.lm_head.weight"


def config_to_hf(config: VLMConfig) -> dict:
    """config.json for VlmJaxForConditionalGeneration (configuration_vlm_jax.VlmJaxConfig)."""
    proj = config.projector
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "vlm_jax",
        "auto_map": dict(AUTO_MAP),
        "vision_config": hf_siglip.vision_config_to_hf(config.vision),
        "text_config": hf_llm.decoder_config_to_hf(config.llm),
        "image_token_id": config.image_token_id,
        "image_seq_length": config.tokens_per_image,
        "vision_feature_layer": config.vision.feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select,
        "projector_type": proj.type,
        "projector_hidden_act": hf_llava.OUR_ACTS[proj.act],
        "projector_bias": proj.bias,
        "projector_input_norm": proj.input_norm,
        "projector_pos_embed": proj.pos_embed,
        "projector_mlp_depth": proj.mlp_depth,
        "projector_hidden_dim": proj.hidden_dim or config.llm.hidden_size,
        "pixel_shuffle_factor": proj.pixel_shuffle_factor,
        "resampler_num_queries": proj.num_queries,
        "resampler_depth": proj.resampler_depth,
        "resampler_heads": proj.resampler_heads,
        "resampler_mlp_ratio": proj.resampler_mlp_ratio,
        "tie_word_embeddings": config.llm.tie_embeddings,
    }


def params_to_hf(params: dict, config: VLMConfig) -> dict[str, np.ndarray]:
    """The whole state dict, with the names the modeling file's modules have."""
    sd = hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix=VISION_PREFIX)
    sd.update(projector_params_to_hf(params["projector"], config))
    sd.update(hf_llm.decoder_params_to_hf(params["llm"], config.llm, prefix=LLM_PREFIX,
                                          lm_head_key=LM_HEAD_KEY))
    return sd


def projector_params_to_hf(params: dict, config: VLMConfig) -> dict[str, np.ndarray]:
    proj = config.projector
    sd: dict[str, np.ndarray] = {}
    if proj.input_norm:
        sd.update(_layernorm(params, "input_norm", "input_norm"))
    if proj.type == "resampler":
        sd.update(_linear(params, "media_proj", "media_proj", bias=True))
        sd[PROJECTOR_PREFIX + "queries"] = _array(params, "queries")
        for i in range(proj.resampler_depth):
            ours, theirs = f"block_{i}", f"blocks.{i}"
            for norm in ("ln_latents", "ln_media", "ln_mlp"):
                sd.update(_layernorm(params, f"{ours}/{norm}", f"{theirs}.{norm}"))
            for name in ("q", "k", "v"):  # kernels [D, H, hd], no bias
                sd.update(_linear(params, f"{ours}/{name}", f"{theirs}.{name}", bias=False))
            sd.update(_linear(params, f"{ours}/o", f"{theirs}.o", bias=False, num_in=2))
            for layer in ("linear_1", "linear_2"):
                sd.update(_linear(params, f"{ours}/mlp/{layer}", f"{theirs}.mlp.{layer}",
                                  bias=True))
        sd.update(_layernorm(params, "ln_out", "ln_out"))
        return sd
    if proj.pos_embed:
        sd[PROJECTOR_PREFIX + "pos_embed"] = _array(params, "pos_embed")
    layers = {"linear": 1, "mlp2x_gelu": 2, "pixel_shuffle": proj.mlp_depth}[proj.type]
    for i in range(1, layers + 1):
        sd.update(_linear(params, f"mlp/linear_{i}", f"mlp.linear_{i}", bias=proj.bias))
    return sd


def _array(params: dict, path: str) -> np.ndarray:
    node = params
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise ConversionError(f"projector params lack {path} (model.projector and the "
                                  f"params disagree)")
        node = node[key]
    return np.asarray(node, np.float32)


def _linear(params: dict, ours: str, theirs: str, bias: bool, num_in: int = 1
            ) -> dict[str, np.ndarray]:
    """Dense kernel [*in, *out] (`num_in` input dims) + bias [*out] -> torch Linear weight
    [out, in] + bias [out]."""
    kernel = _array(params, f"{ours}/kernel")
    weight = kernel.reshape(int(np.prod(kernel.shape[:num_in])), -1).T
    sd = {f"{PROJECTOR_PREFIX}{theirs}.weight": np.ascontiguousarray(weight)}
    if bias:
        sd[f"{PROJECTOR_PREFIX}{theirs}.bias"] = _array(params, f"{ours}/bias").reshape(-1)
    return sd


def _layernorm(params: dict, ours: str, theirs: str) -> dict[str, np.ndarray]:
    return {f"{PROJECTOR_PREFIX}{theirs}.weight": _array(params, f"{ours}/scale"),
            f"{PROJECTOR_PREFIX}{theirs}.bias": _array(params, f"{ours}/bias")}


def write_code(out: str) -> None:
    """Copy the remote-code files next to config.json."""
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(CODE_DIR, name), os.path.join(out, name))
