"""HF `PaliGemmaForConditionalGeneration` (SigLIP + one Linear + Gemma / Gemma 2) <-> our VLM.

What transformers 5.x PaliGemma computes, and how our VLM is set to compute the same:
  * vision: `vision_tower(pixel_values).last_hidden_state`, i.e. every encoder layer and then
    `post_layernorm` (no `vision_feature_layer`, no CLS to drop): our VisionConfig with
    `feature_layer=-1, feature_post_norm=True`; select "full".
  * projector: `multi_modal_projector.linear` (Linear with bias, vision width ->
    `projection_dim`, which must be the text hidden size): our projector type "linear".
  * image features are written into `inputs_embeds` *after* Gemma's embedding scale (the
    scaled embedding lives inside `embed_tokens` in 5.x; 4.x divided the features by
    sqrt(hidden_size) and scaled everything afterwards: the same numbers). Our VLM splices image
    features after `Decoder.embed`'s scale too, so no feature scale is needed.
  * text: the Gemma / Gemma 2 model of `text_config`; PaliGemma's own lm_head applies Gemma 2's
    `final_logit_softcapping` (kept on import, unlike LLaVA).
  * positions are 1-indexed (`arange + 1`); RoPE depends on differences only, so ours (0-indexed)
    differ by float rounding (~1e-6), not in kind.
  * attention: `token_type_ids == 0` (image + prompt) attends bidirectionally, the rest
    causally (`block_sequence_ids`): our `mask_ar` = token_type_ids. Without token_type_ids it is
    causal. Sliding layers (Gemma 2) never cut the bidirectional block (the window applies only to
    pairs outside it): `layers.sliding_window_mask` does the same.

Tensor names are LLaVA's on disk (`vision_tower.`, `multi_modal_projector.`,
`language_model.model.`, `language_model.lm_head.`) and in memory (`model.vision_tower.` ...), so
`hf_llava.normalize_keys` / `exporter.to_disk_keys` map them; only the projector differs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import hf_llava, hf_llm, hf_siglip
from vlm_jax.convert.hf_io import check_keys
from vlm_jax.errors import ConversionError
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.vlm import VLM, VLMConfig

ARCHITECTURE = "PaliGemmaForConditionalGeneration"
MODEL_TYPE = "paligemma"
TEXT_FAMILIES = ("gemma", "gemma2")  # PaliGemma (1) and PaliGemma 2
VISION_PREFIX = hf_llava.VISION_PREFIX
LLM_PREFIX = hf_llava.LLM_PREFIX
LM_HEAD_KEY = hf_llava.LM_HEAD_KEY
LINEAR_PREFIX = hf_llava.PROJECTOR_PREFIX + "linear."


def config_from_hf(hf: dict) -> VLMConfig:
    """VLMConfig for a HF PaliGemma config.json dict; unsupported fields raise naming the field."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"model_type={hf.get('model_type')!r}: expected {MODEL_TYPE!r}")
    vision_hf = hf.get("vision_config") or {}
    if vision_hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConversionError(f"vision_config.model_type={vision_hf.get('model_type')!r}: only "
                              f"SigLIP vision towers ('siglip_vision_model') are supported")
    vision = hf_siglip.vision_config_from_hf(vision_hf, feature_layer=-1, feature_post_norm=True)
    text_hf = dict(hf.get("text_config") or {})
    if text_hf.get("model_type", "gemma") not in TEXT_FAMILIES:
        raise ConversionError(f"text_config.model_type={text_hf.get('model_type')!r}: PaliGemma "
                              f"text models supported: {TEXT_FAMILIES}")
    text_hf.setdefault("model_type", "gemma")
    # PaliGemmaConfig sets it (to True) on its text config: the attention there is PaliGemma's
    # own mask (bidirectional prefix from token_type_ids), not a property of the decoder.
    text_hf.pop("use_bidirectional_attention", None)
    if "tie_word_embeddings" in hf:  # the top-level flag is the one PaliGemma honours
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm = hf_llm.decoder_config_from_hf(text_hf)  # final_logit_softcap kept: PaliGemma applies it
    projection = int(hf.get("projection_dim", 2048))
    if projection != llm.hidden_size:
        raise ConversionError(f"projection_dim={projection} but text_config.hidden_size="
                              f"{llm.hidden_size}: the projector must map into the text width")
    return VLMConfig(
        vision=vision, projector=ProjectorConfig(type="linear", bias=True), llm=llm,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 256000))),
        vision_feature_select="full")


def blocker(config: VLMConfig) -> str | None:
    """Why HF PaliGemma cannot hold this model (naming the field), or None when it can."""
    vision, proj, llm = config.vision, config.projector, config.llm
    if llm.family not in TEXT_FAMILIES:
        return (f"model.llm.family={llm.family!r}: HF PaliGemma's text model is one of "
                f"{TEXT_FAMILIES}")
    if proj.type != "linear":
        return (f"model.projector.type={proj.type!r}: HF PaliGemma's projector is one Linear "
                f"('linear')")
    if not proj.bias:
        return "model.projector.bias=False: HF PaliGemma's projector Linear has a bias"
    for field in ("input_norm", "pos_embed"):
        if getattr(proj, field):
            return f"model.projector.{field}=True: HF PaliGemma's projector is one Linear only"
    if vision.feature_layer % (vision.depth + 1) != vision.depth:
        return (f"model.vision.feature_layer={vision.feature_layer}: HF PaliGemma reads the "
                f"vision tower's last layer (-1)")
    if not vision.feature_post_norm:
        return ("model.vision.feature_post_norm=False: HF PaliGemma reads the vision tower's "
                "last_hidden_state, after post_layernorm")
    if config.vision_feature_select != "full":
        return (f"model.vision_feature_select={config.vision_feature_select!r}: HF PaliGemma "
                f"keeps every patch token ('full')")
    return None


def config_to_hf(config: VLMConfig) -> dict:
    """config.json dict for PaliGemmaForConditionalGeneration; refuses what it cannot express."""
    why = blocker(config)
    if why is not None:
        raise ConversionError(why)
    hidden = config.llm.hidden_size
    vision = dict(hf_siglip.vision_config_to_hf(config.vision), projection_dim=hidden)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vision_config": vision,
        "text_config": hf_llm.decoder_config_to_hf(config.llm),
        "image_token_index": config.image_token_id,
        "projection_dim": hidden,
        "hidden_size": hidden,
        "vocab_size": config.llm.vocab_size,
        "tie_word_embeddings": config.llm.tie_embeddings,
    }


def params_from_hf(sd: dict, config: VLMConfig) -> dict:
    """Our param tree from a HF PaliGemma state dict (on-disk or in-memory key names); refuses
    missing, unexpected or mis-shaped tensors."""
    sd = hf_llava.normalize_keys(sd)
    dv, dt = config.vision.width, config.llm.hidden_size
    projector = {}
    for name, shape in (("weight", (dt, dv)), ("bias", (dt,))):
        key = LINEAR_PREFIX + name
        if key not in sd:
            raise ConversionError(f"HF tensor {key!r} is missing from the state dict")
        value = np.asarray(sd[key])
        if value.shape != shape:
            raise ConversionError(f"HF tensor {key!r} has shape {value.shape}, expected {shape} "
                                  f"from the vision and text configs")
        projector[name] = value
    params = {
        "vision_tower": hf_siglip.vision_params_from_hf(sd, config.vision, prefix=VISION_PREFIX),
        "projector": {"mlp": {"linear_1": {"kernel": np.ascontiguousarray(projector["weight"].T),
                                           "bias": projector["bias"]}}},
        "llm": hf_llm.decoder_params_from_hf(sd, config.llm, prefix=LLM_PREFIX,
                                             lm_head_key=LM_HEAD_KEY),
    }
    check_keys(sd, set(params_to_hf(params, config)), "HF PaliGemma checkpoint")
    return params


def params_to_hf(params: dict, config: VLMConfig) -> dict:
    """HF state dict with transformers 5.x in-memory names (`exporter.to_disk_keys` for disk)."""
    linear = params["projector"]["mlp"]["linear_1"]
    sd = hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix=VISION_PREFIX)
    sd[LINEAR_PREFIX + "weight"] = np.ascontiguousarray(np.asarray(linear["kernel"]).T)
    sd[LINEAR_PREFIX + "bias"] = np.asarray(linear["bias"])
    sd.update(hf_llm.decoder_params_to_hf(params["llm"], config.llm, prefix=LLM_PREFIX,
                                          lm_head_key=LM_HEAD_KEY))
    return sd


def mask_ar_from_token_type_ids(token_type_ids: np.ndarray) -> np.ndarray:
    """PaliGemma's token_type_ids (0 = image + prompt, 1 = suffix) -> our mask_ar: the same
    vector (zeros: one bidirectional block; ones: each token a causal block of its own). Exact
    for a prefix followed by its suffix, which is what the processor writes."""
    return np.asarray(token_type_ids, np.int32)


def probe_logits(hf_model, config: VLMConfig, params_exact, params_f32):
    """A loaded PaliGemmaForConditionalGeneration (f32, eager attention) and our model on one
    probe row: 4 text tokens, the image, 3 prompt tokens as the
    bidirectional prefix, then a 5-token causal suffix. -> (ours on `params_exact`,
    ours on `params_f32`, theirs), logits f32[1, T, V]."""
    import torch

    rng = np.random.default_rng(0)
    text = [int(t) for t in rng.integers(0, config.llm.vocab_size, 24) if t != config.image_token_id]
    ids = np.array([text[:4] + [config.image_token_id] * config.tokens_per_image + text[4:12]])
    token_type = np.zeros_like(ids)
    token_type[:, -5:] = 1
    size = config.vision.image_size
    pixels = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        theirs = hf_model.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                                 token_type_ids=torch.tensor(token_type)).logits.numpy()
    t = ids.shape[1]
    model = VLM(config)
    forward = jax.jit(lambda p: model.apply(
        {"params": p}, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None],
        jnp.arange(1, t + 1, dtype=jnp.int32)[None], jnp.asarray(mask_ar_from_token_type_ids(token_type))))
    ours_exact = np.asarray(forward(params_exact))
    ours_f32 = ours_exact if params_f32 is params_exact else np.asarray(forward(params_f32))
    return ours_exact, ours_f32, theirs


__all__ = ["config_from_hf", "config_to_hf", "params_from_hf", "params_to_hf", "blocker",
           "probe_logits", "mask_ar_from_token_type_ids"]
