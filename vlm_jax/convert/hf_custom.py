"""Our VLM <-> a self-contained transformers directory (remote code) for what HF LLaVA cannot hold
(`import-hf --hf-dir` reads such a directory back: `config_from_hf`, `params_from_hf`).

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
    cross_attention.{i}.*          cross-attention block i (fusion="cross_attention"), Mllama's
                                   names: input_layernorm, cross_attn.{q,k,v,o}_proj,
                                   cross_attn.{q,k}_norm, cross_attn_attn_gate,
                                   post_attention_layernorm, mlp.{gate,up,down}_proj,
                                   cross_attn_mlp_gate
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping

import numpy as np

from vlm_jax.convert import hf_llava, hf_llm, hf_siglip
from vlm_jax.convert.hf_io import check_keys
from vlm_jax.errors import ConversionError
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import VLMConfig, param_shapes

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_hf")
CODE_FILES = ("configuration_vlm_jax.py", "modeling_vlm_jax.py", "processing_vlm_jax.py")
ARCHITECTURE = "VlmJaxForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_vlm_jax.VlmJaxConfig",
            "AutoModelForImageTextToText": f"modeling_vlm_jax.{ARCHITECTURE}"}
PROCESSOR_CLASS = "VlmJaxProcessor"
TILED_PROCESSOR_CLASS = "VlmJaxTiledProcessor"  # a model trained with data.tiling
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "projector."
LLM_PREFIX = "language_model.model."
LM_HEAD_KEY = "language_model.lm_head.weight"
CROSS_PREFIX = "cross_attention."
MLP_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}  # our mlp_act -> ACT2FN name


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
        "vision_feature_post_norm": config.vision.feature_post_norm,
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
        "fusion": config.fusion,
        "cross_attention_layers": list(config.cross_attention_layers),
        "cross_attention_mlp_act": MLP_ACTS[config.llm.mlp_act],
        "cross_attention_norm_plus_one": config.llm.norm_plus_one,
    }


def params_to_hf(params: dict, config: VLMConfig) -> dict[str, np.ndarray]:
    """The whole state dict, with the names the modeling file's modules have."""
    sd = hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix=VISION_PREFIX)
    sd.update(projector_params_to_hf(params["projector"], config))
    sd.update(hf_llm.decoder_params_to_hf(params["llm"], config.llm, prefix=LLM_PREFIX,
                                          lm_head_key=LM_HEAD_KEY))
    if config.fusion == "cross_attention":
        sd.update(cross_attention_params_to_hf(params["cross_attention"], config))
    return sd


def _cross_attention_entries(config: VLMConfig) -> list[tuple[str, str, tuple, tuple]]:
    """(our path, HF name, in_shape, out_shape) per tensor of one block: kernels [*in, *out] <->
    Linear weights [out, in]; in_shape None = a norm scale or gate, as is."""
    llm = config.llm
    d, h, k, hd, f = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.mlp_dim
    return [
        ("pre_attention_norm/scale", "input_layernorm.weight", None, None),
        ("attention/q/kernel", "cross_attn.q_proj.weight", (d,), (h, hd)),
        ("attention/k/kernel", "cross_attn.k_proj.weight", (d,), (k, hd)),
        ("attention/v/kernel", "cross_attn.v_proj.weight", (d,), (k, hd)),
        ("attention/o/kernel", "cross_attn.o_proj.weight", (h, hd), (d,)),
        ("attention/q_norm/scale", "cross_attn.q_norm.weight", None, None),
        ("attention/k_norm/scale", "cross_attn.k_norm.weight", None, None),
        ("attention_gate", "cross_attn_attn_gate", None, None),
        ("pre_mlp_norm/scale", "post_attention_layernorm.weight", None, None),
        ("mlp/gate/kernel", "mlp.gate_proj.weight", (d,), (f,)),
        ("mlp/up/kernel", "mlp.up_proj.weight", (d,), (f,)),
        ("mlp/down/kernel", "mlp.down_proj.weight", (f,), (d,)),
        ("mlp_gate", "cross_attn_mlp_gate", None, None),
    ]


def cross_attention_params_to_hf(stacked: dict, config: VLMConfig) -> dict[str, np.ndarray]:
    """Our stacked blocks [n, ...] -> cross_attention.{i}.* tensors."""
    sd = {}
    for path, name, in_shape, _ in _cross_attention_entries(config):
        node = stacked
        for key in path.split("/"):
            node = node[key]
        for i, value in enumerate(np.asarray(node, np.float32)):
            if in_shape is not None:
                value = value.reshape(int(np.prod(in_shape)), -1).T
            sd[f"{CROSS_PREFIX}{i}.{name}"] = np.ascontiguousarray(value)
    return sd


def cross_attention_params_from_hf(sd: Mapping[str, np.ndarray], config: VLMConfig) -> dict:
    """Inverse of `cross_attention_params_to_hf`."""
    stacked: dict = {}
    for path, name, in_shape, out_shape in _cross_attention_entries(config):
        blocks = []
        for i in range(len(config.cross_attention_layers)):
            key = f"{CROSS_PREFIX}{i}.{name}"
            if key not in sd:
                raise ConversionError(f"tensor {key!r} is missing (config.json's "
                                      f"cross_attention_layers say the model has it)")
            value = np.asarray(sd[key], np.float32)
            if in_shape is not None:
                value = value.T.reshape(tuple(in_shape) + tuple(out_shape))
            blocks.append(value)
        node, keys = stacked, path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = np.stack(blocks)
    return stacked


def _projector_entries(config: VLMConfig) -> list[tuple]:
    """The projector's tensors as (kind, our path, HF name, options): "linear" (kernel [*in, *out]
    <-> weight [out, in], + bias), "norm" (scale / bias <-> weight / bias), "array" (as is).
    Both directions walk this one list."""
    proj = config.projector
    entries: list[tuple] = []
    if proj.input_norm:
        entries.append(("norm", "input_norm", "input_norm", {}))
    if proj.type == "resampler":
        entries.append(("linear", "media_proj", "media_proj", dict(bias=True)))
        entries.append(("array", "queries", "queries", {}))
        for i in range(proj.resampler_depth):
            ours, theirs = f"block_{i}", f"blocks.{i}"
            for norm in ("ln_latents", "ln_media", "ln_mlp"):
                entries.append(("norm", f"{ours}/{norm}", f"{theirs}.{norm}", {}))
            for name in ("q", "k", "v"):  # kernels [D, H, hd], no bias
                entries.append(("linear", f"{ours}/{name}", f"{theirs}.{name}", dict(bias=False)))
            entries.append(("linear", f"{ours}/o", f"{theirs}.o", dict(bias=False, num_in=2)))
            for layer in ("linear_1", "linear_2"):
                entries.append(("linear", f"{ours}/mlp/{layer}", f"{theirs}.mlp.{layer}",
                                dict(bias=True)))
        entries.append(("norm", "ln_out", "ln_out", {}))
        return entries
    if proj.pos_embed:
        entries.append(("array", "pos_embed", "pos_embed", {}))
    layers = {"linear": 1, "mlp2x_gelu": 2, "pixel_shuffle": proj.mlp_depth}[proj.type]
    for i in range(1, layers + 1):
        entries.append(("linear", f"mlp/linear_{i}", f"mlp.linear_{i}", dict(bias=proj.bias)))
    return entries


def projector_params_to_hf(params: dict, config: VLMConfig) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for kind, ours, theirs, options in _projector_entries(config):
        if kind == "linear":
            sd.update(_linear(params, ours, theirs, **options))
        elif kind == "norm":
            sd.update(_layernorm(params, ours, theirs))
        else:
            sd[PROJECTOR_PREFIX + theirs] = _array(params, ours)
    return sd


def projector_params_from_hf(sd: Mapping[str, np.ndarray], config: VLMConfig) -> dict:
    """Inverse of `projector_params_to_hf`: shapes from the model `config` describes."""
    shapes = param_shapes(config)["projector"]
    params: dict = {}

    def put(path: str, value: np.ndarray) -> None:
        node, keys = params, path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        want = _shape_at(shapes, path)
        if value.size != int(np.prod(want)):
            raise ConversionError(f"{PROJECTOR_PREFIX}{path}: {value.shape} does not fit the "
                                  f"projector's {tuple(want)}")
        node[keys[-1]] = np.ascontiguousarray(value.reshape(want))

    def take(name: str) -> np.ndarray:
        key = PROJECTOR_PREFIX + name
        if key not in sd:
            raise ConversionError(f"tensor {key!r} is missing (config.json's projector fields "
                                  f"say the model has it)")
        return np.asarray(sd[key])

    for kind, ours, theirs, options in _projector_entries(config):
        if kind == "linear":
            weight = take(f"{theirs}.weight")  # [out, in]
            put(f"{ours}/kernel", weight.T)
            if options.get("bias"):
                put(f"{ours}/bias", take(f"{theirs}.bias"))
        elif kind == "norm":
            put(f"{ours}/scale", take(f"{theirs}.weight"))
            put(f"{ours}/bias", take(f"{theirs}.bias"))
        else:
            put(ours, take(theirs))
    return params


def _shape_at(tree: Mapping, path: str) -> tuple[int, ...]:
    node = tree
    for key in path.split("/"):
        node = node[key]
    return tuple(node.shape)


def config_from_hf(hf: Mapping) -> VLMConfig:
    """Our VLMConfig from a custom export's config.json (`config_to_hf`'s inverse)."""
    if hf.get("model_type") != "vlm_jax":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: expected 'vlm_jax'")
    text = dict(hf["text_config"])
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm = hf_llm.decoder_config_from_hf(text)
    act = hf.get("projector_hidden_act", "gelu")
    if act not in hf_llava.HF_ACTS:
        raise ConversionError(f"projector_hidden_act={act!r}; supported: {sorted(hf_llava.HF_ACTS)}")
    hidden = int(hf.get("projector_hidden_dim") or 0)
    projector = ProjectorConfig(
        type=hf["projector_type"], act=hf_llava.HF_ACTS[act], bias=bool(hf["projector_bias"]),
        input_norm=bool(hf.get("projector_input_norm")), pos_embed=bool(hf.get("projector_pos_embed")),
        mlp_depth=int(hf.get("projector_mlp_depth", 2)),
        hidden_dim=0 if hidden == llm.hidden_size else hidden,
        pixel_shuffle_factor=int(hf.get("pixel_shuffle_factor", 2)),
        num_queries=int(hf.get("resampler_num_queries", 64)),
        resampler_depth=int(hf.get("resampler_depth", 2)),
        resampler_heads=int(hf.get("resampler_heads", 8)),
        resampler_mlp_ratio=int(hf.get("resampler_mlp_ratio", 4)))
    vision = dataclasses.replace(hf_siglip.vision_config_from_hf(hf["vision_config"]),
                                 feature_layer=int(hf["vision_feature_layer"]),
                                 feature_post_norm=bool(hf.get("vision_feature_post_norm")))
    config = VLMConfig(vision=vision, projector=projector, llm=llm,
                       image_token_id=int(hf["image_token_id"]),
                       vision_feature_select=hf.get("vision_feature_select_strategy", "full"),
                       fusion=hf.get("fusion", "early"),
                       cross_attention_layers=tuple(hf.get("cross_attention_layers", ())))
    seq = hf.get("image_seq_length")
    if seq is not None and seq != config.tokens_per_image:
        raise ConversionError(f"image_seq_length={seq} but the vision tower and projector give "
                              f"{config.tokens_per_image} tokens per image")
    return config


def params_from_hf(sd: Mapping[str, np.ndarray], config: VLMConfig) -> dict:
    """Our param tree from a custom export's state dict; refuses missing or unexpected tensors."""
    params = {
        "vision_tower": hf_siglip.vision_params_from_hf(sd, config.vision, prefix=VISION_PREFIX),
        "projector": projector_params_from_hf(sd, config),
        "llm": hf_llm.decoder_params_from_hf(sd, config.llm, prefix=LLM_PREFIX,
                                             lm_head_key=LM_HEAD_KEY),
    }
    if config.fusion == "cross_attention":
        params["cross_attention"] = cross_attention_params_from_hf(sd, config)
    check_keys(dict(sd), set(params_to_hf(params, config)), "vlm_jax custom export")
    return params


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
