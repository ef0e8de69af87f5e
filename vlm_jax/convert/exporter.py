"""`vlm-jax export-hf`: a vlm_jax model directory -> a HF transformers directory that checks itself.

    export_hf(checkpoint, out, dtype="float32", part="vlm", format="auto") -> ExportResult

`part="vlm"` writes the whole VLM in one of two formats (`format="auto"`: LLaVA when the model is
LLaVA-expressible, `llava_blocker`, else custom):
  llava   a `LlavaForConditionalGeneration` directory: model.safetensors with the key names
          transformers' own `save_pretrained` writes on disk (`vision_tower.*`,
          `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`),
          config.json, the tokenizer (with `<image>`) and a LlavaProcessor config, so that
          `AutoProcessor` expands `<image>` to `image_seq_length` tokens and preprocesses images
          as our pipeline does. Only an mlp2x_gelu projector without input_norm / pos_embed.
  custom  any composition, as transformers remote code (`hf_custom.py`): the directory carries
          its modeling, configuration and processing files; `AutoModelForImageTextToText` /
          `AutoProcessor.from_pretrained(out, trust_remote_code=True)` load it.
`part="vision"` writes the encoder alone as a `SiglipVisionModel`; `part="llm"` the decoder alone
as its family's *ForCausalLM (config.json and model.safetensors as `save_pretrained` writes them).

The export is written into a temporary directory beside `out`, loaded there in transformers and
compared with our model on a probe input, both in f32 whatever the model was trained in (a
compute dtype is a run setting, not part of the model); only a passing export is moved to `out`.
A mismatch raises `ExportMismatch` (the CLI exits non-zero) and leaves nothing behind. A non-empty
`out` is refused unless `overwrite=True`. Training's final `model/` already has LoRA adapters
merged (`TrainPlan.model_params`).

Besides the weights, a VLM export (either format, `hf_processor.py`) carries what makes
transformers answer as we do: the chat template the model was trained with (as the processor's
Jinja template; an untrained import keeps its LLM's own), `generation_config.json` with the stop
tokens our `generate` stops at (EOS and the template's end-of-turn token, over the imported LLM's
generation config), and an image processor that pads to a square first when training did
(`LlavaImageProcessorPil(do_pad=True)`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np

from vlm_jax import model_dir
from vlm_jax.api import LoadedModel
from vlm_jax.convert import (hf_custom, hf_idefics3, hf_io, hf_llava, hf_llm, hf_paligemma,
                             hf_processor, hf_siglip)
from vlm_jax.convert.hf_processor import ChatSettings
from vlm_jax.data import tiling
from vlm_jax.errors import ConversionError, ExportMismatch, InputError
from vlm_jax.inference.generate import greedy_generate
from vlm_jax.inference.prompts import prompt_ids, stop_token_ids
from vlm_jax.models.siglip import SiglipVisionTower
from vlm_jax.models.vlm import VLMConfig, architecture_only

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
PARTS = ("vlm", "vision", "llm")
FORMATS = ("auto", "llava", "paligemma", "idefics3", "custom")
# Same weights on both sides and f32 compute: only the order of float operations differs.
F32_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits: each weight moves by up to 2^-9 (0.2%) relative. Through a few
# layers of sums of such products the logits move by well under 2% of their own scale; a
# conversion bug (a transposed or swapped tensor) moves them by O(100%).
BF16_RELATIVE_TOLERANCE = 2e-2

# In-memory (transformers 5.x) prefix -> on-disk prefix written by `save_pretrained`.
_DISK_PREFIXES = (
    (hf_llava.LLM_PREFIX, "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    (hf_llava.VISION_PREFIX, "vision_tower."),
    (hf_llava.PROJECTOR_PREFIX, "multi_modal_projector."),
)
_PROBE_TEXT = "<image>\nWhat is in this picture? A red circle."
_PROBE_QUESTION = "What is in this picture?"
ANSWER_TOKENS = 8  # greedy answer length compared by the self-check



@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: str
    part: str
    dtype: str
    max_abs_diff: float        # ours vs transformers, same (possibly bf16-rounded) weights
    tolerance: float
    bf16_drift: float | None   # bf16 export only: transformers vs our f32 weights
    bf16_bound: float | None
    processor: bool            # whether tokenizer + processor files were written
    pad_to_square: bool = False  # the processor pads images to a square first
    answer_tokens: int | None = None  # greedy answer compared with transformers' (None: not)
    format: str | None = None  # part "vlm": "llava", "paligemma", "idefics3" or "custom"
    no_processor: str | None = None  # why only tokenizer files were written, if so
    left_out: tuple[str, ...] = ()  # part "vlm": param groups no format writes (see NOT_EXPORTED)


# What a VLM export never writes: the contrastive text tower, its logit scale / bias and the
# image-text matching head score pairs; no transformers VLM class has them (vlm-jax eval / score
# use them from the model directory).
NOT_EXPORTED = ("text_tower", "contrastive", "itm_head")


def not_exported(params: Any, part: str) -> tuple[str, ...]:
    """The NOT_EXPORTED groups a `part` export of `params` leaves behind (said by `describe`)."""
    return tuple(k for k in NOT_EXPORTED if k in params) if part == "vlm" else ()


def to_disk_keys(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5.x in-memory LLaVA names -> the names `save_pretrained` writes."""
    out = {}
    for key, value in state_dict.items():
        for memory, disk in _DISK_PREFIXES:
            if key.startswith(memory):
                key = disk + key[len(memory):]
                break
        else:
            raise ConversionError(f"tensor {key!r} is outside the LLaVA layout")
        out[key] = value
    return out


def export_hf(checkpoint_path: str, out: str, dtype: str = "float32", part: str = "vlm",
              check: bool = True, overwrite: bool = False, format: str = "auto",
              max_shard_size: str | int = hf_io.DEFAULT_SHARD_SIZE) -> ExportResult:
    """Export a model directory (or a finished workdir) to `out`; checks itself unless told not.
    Weights above `max_shard_size` are written as safetensors shards with an index."""
    _check_options(dtype, part, format, max_shard_size)
    source = model_dir.resolve_model_dir(checkpoint_path, "--checkpoint")
    model_dir.check_output_dir(out, [source], overwrite)
    data = model_dir.load_data_settings(source)
    if data["prefix_lm"] and part == "vlm" and \
            resolve_format(architecture_only(model_dir.load_config(source)), format) != "paligemma":
        raise ConversionError(
            f"{source} attends bidirectionally over image + prompt (prefix-LM: trained with "
            f"data.prefix_lm=True, or a PaliGemma import); only --format paligemma expresses "
            f"that, and this model is not PaliGemma-shaped (--format {format} would export a "
            f"causal model that answers differently)")
    config, params, tokenizer = model_dir.load_model(source)
    params = model_dir.numpy_params(params)
    chat = ChatSettings(data["template"], data["pad_to_square"],
                        model_dir.load_generation_config(source), data["tiling"])
    return export_params(config, params, tokenizer, out, dtype=dtype, part=part, check=check,
                         chat=chat, overwrite=overwrite, format=format,
                         max_shard_size=max_shard_size)


def export_params(config: VLMConfig, params: Any, tokenizer, out: str, dtype: str = "float32",
                  part: str = "vlm", check: bool = True, chat: ChatSettings = ChatSettings(),
                  overwrite: bool = False, format: str = "auto",
                  max_shard_size: str | int = hf_io.DEFAULT_SHARD_SIZE) -> ExportResult:
    """Write `params` (plain nested dict, LoRA already merged) as a HF directory, then check it.
    The files go to a temporary directory first and reach `out` only once the check passed."""
    _check_options(dtype, part, format, max_shard_size)
    model_dir.check_output_dir(out, [], overwrite)
    config = architecture_only(config)  # the self-check compares f32 with f32
    # Decided from the config alone: a refused format writes nothing, reads no weight.
    fmt = resolve_format(config, format, chat.tiling.enabled) if part == "vlm" else None
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.export-",
                               dir=parent)
    try:
        result = _write_and_check(config, params, tokenizer, staging, dtype, part, fmt, check,
                                  chat, max_shard_size)
        model_dir.move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(result, out=out)


def _write_and_check(config: VLMConfig, params: Any, tokenizer, out: str, dtype: str, part: str,
                     fmt: str | None, check: bool, chat: ChatSettings,
                     max_shard_size: str | int = hf_io.DEFAULT_SHARD_SIZE) -> ExportResult:
    if part == "vision":
        if config.vision is None:
            raise ConversionError("--part vision: this model has no vision tower")
        state_dict = hf_siglip.vision_params_to_hf(params["vision_tower"], config.vision, prefix="")
        hf_config = dict(hf_siglip.vision_config_to_hf(config.vision),
                         architectures=["SiglipVisionModel"])
    elif part == "llm":
        if config.llm is None:
            raise ConversionError("--part llm: this model has no LLM")
        state_dict = hf_llm.decoder_params_to_hf(params["llm"], config.llm)
        hf_config = hf_llm.decoder_config_to_hf(config.llm)
    elif fmt == "llava":
        hf_config = hf_llava.config_to_hf(config)
        state_dict = to_disk_keys(hf_llava.params_to_hf(params, config))
    elif fmt == "paligemma":
        hf_config = hf_paligemma.config_to_hf(config)
        state_dict = to_disk_keys(hf_paligemma.params_to_hf(params, config))
    elif fmt == "idefics3":
        hf_config = hf_idefics3.config_to_hf(config)
        state_dict = hf_idefics3.params_to_hf(params, config)
    else:
        hf_config = hf_custom.config_to_hf(config)
        state_dict = hf_custom.params_to_hf(params, config)
    if part != "vision":
        hf_config = _with_token_ids(hf_config, chat, tokenizer)
    hf_config = _with_dtype(hf_config, dtype)
    hf_io.write_hf_dir(out, hf_config, _in_export_dtype(state_dict, config, dtype), max_shard_size)
    if fmt == "custom":
        hf_custom.write_code(out)
    has_processor = False
    no_processor = hf_processor.processor_blocker(fmt, chat, tokenizer) if fmt else None
    if part == "vlm" and tokenizer is not None and no_processor is not None:
        tokenizer.save(out)  # tokenizer files only; `describe` says why
        hf_processor.write_generation_config(out, tokenizer, chat)
    elif part == "vlm" and tokenizer is not None:
        hf_processor.write_processor(out, config, tokenizer, chat, fmt)
        hf_processor.write_generation_config(out, tokenizer, chat)
        has_processor = True
    elif part == "llm" and tokenizer is not None:  # the LLM's own tokenizer, no processor
        tokenizer.save(out)
        hf_processor.write_generation_config(out, tokenizer, chat)
    result = ExportResult(out, part, dtype, float("nan"), F32_TOLERANCE, None, None, has_processor,
                          chat.pad_to_square, format=fmt,
                          no_processor=no_processor if tokenizer is not None else None,
                          left_out=not_exported(params, part))
    if check:
        if part == "vision":
            result = check_vision_export(result, config, params, tokenizer)
        elif part == "llm":
            result = check_llm_export(result, config, params)
        elif fmt == "llava":
            result = check_llava_export(result, config, params, tokenizer, chat)
        elif fmt == "paligemma":
            result = check_paligemma_export(result, config, params, tokenizer, chat)
        elif fmt == "idefics3":
            result = check_idefics3_export(result, config, params, tokenizer, chat)
        else:
            result = check_custom_export(result, config, params, tokenizer, chat)
    return result


def _in_export_dtype(state_dict: dict[str, np.ndarray], config: VLMConfig, dtype: str
                     ) -> dict[str, np.ndarray]:
    """Every tensor in `dtype`, but a sincos2d position table: no weight of ours (we compute it in
    f32 from the grid), it stays f32 so that a bf16 export still computes the positions we do."""
    fixed_table = config.vision is not None and config.vision.posemb == "sincos2d"

    def written_dtype(key: str):
        if fixed_table and key.endswith(hf_siglip.POSITION_TABLE):
            return np.float32
        return EXPORT_DTYPES[dtype]
    return {k: np.asarray(v, np.float32).astype(written_dtype(k)) for k, v in state_dict.items()}


def _check_options(dtype: str, part: str, format: str,
                   max_shard_size: str | int = hf_io.DEFAULT_SHARD_SIZE) -> None:
    hf_io.parse_size(max_shard_size)
    if dtype not in EXPORT_DTYPES:
        raise InputError(f"--dtype {dtype!r}; supported: {tuple(EXPORT_DTYPES)}")
    if part not in PARTS:
        raise InputError(f"--part {part!r}; supported: {PARTS}")
    if format not in FORMATS:
        raise InputError(f"--format {format!r}; supported: {FORMATS}")
    if part != "vlm" and format != "auto":
        what = "a SiglipVisionModel" if part == "vision" else "the LLM's *ForCausalLM"
        raise InputError(f"--format {format} is for --part vlm; --part {part} always writes {what}")


def resolve_format(config: VLMConfig, requested: str, tiled: bool = False) -> str:
    """"llava" or "custom" for a whole-VLM export: `auto` picks LLaVA where it can hold the model;
    `llava` for a model it cannot hold raises, naming the field that prevents it. A model
    trained on tiles (`tiled`) gets a format whose processor tiles: `auto` picks Idefics3 where
    it holds the model, else custom."""
    missing = [p for p in ("vision", "projector", "llm") if getattr(config, p) is None]
    if missing:
        raise ConversionError(f"a VLM export needs a vision tower, projector and LLM; this model "
                              f"lacks {', '.join(missing)} (use --part vision for the encoder "
                              f"alone, --part llm for the decoder alone)")
    if config.fusion != "early":
        if requested not in ("auto", "custom"):
            raise ConversionError(
                f"--format {requested}: model.fusion={config.fusion!r} (cross-attention blocks "
                f"inside the LLM) has no {requested} equivalent in transformers (--format custom "
                f"or auto exports it)")
        return "custom"
    paligemma_blocker = hf_paligemma.blocker(config)
    if requested == "paligemma" and paligemma_blocker is not None:
        raise ConversionError(f"--format paligemma: {paligemma_blocker} (--format custom or auto "
                              f"exports it)")
    blocker = llava_blocker(config)
    if requested == "auto" and tiled:
        return "idefics3" if hf_idefics3.blocker(config) is None else "custom"
    if requested == "auto":
        if paligemma_blocker is None:  # only a PaliGemma import (feature_post_norm) gets here
            return "paligemma"
        if blocker is not None and hf_idefics3.blocker(config) is None:
            return "idefics3"
        return "llava" if blocker is None else "custom"
    if requested == "idefics3" and hf_idefics3.blocker(config) is not None:
        raise ConversionError(f"--format idefics3: {hf_idefics3.blocker(config)} (--format custom "
                              f"or auto exports it)")
    if requested == "llava" and blocker is not None:
        raise ConversionError(f"--format llava: {blocker} (--format custom or auto exports it)")
    return requested


def llava_blocker(config: VLMConfig) -> str | None:
    """Why HF LLaVA cannot hold this model (naming the field), or None when it can."""
    proj = config.projector
    if proj.type != "mlp2x_gelu":
        return (f"model.projector.type={proj.type!r} cannot be exported to HF LLaVA, whose "
                f"projector is Linear -> act -> Linear only ('mlp2x_gelu'); projector type "
                f"{proj.type!r} has no LlavaForConditionalGeneration equivalent")
    for field, what in (("input_norm", "LayerNorm"), ("pos_embed", "position embedding")):
        if getattr(proj, field):
            return (f"model.projector.{field}=True cannot be exported to HF LLaVA: its projector "
                    f"has no {what} before the first Linear")
    try:  # what LLaVA's config cannot express (e.g. a final soft-cap its lm_head does not apply)
        hf_llava.config_to_hf(config)
    except ConversionError as e:
        return str(e)
    return None


def _with_token_ids(hf_config: dict, chat: ChatSettings, tokenizer) -> dict:
    """The text config's bos / eos / pad ids: the imported LLM's (its generation config keeps
    them), else the tokenizer's, else None; never left to the HF class defaults, which belong to
    another vocabulary (SmolLM3's pad id 128004 does not even build with a smaller one)."""
    generation = chat.generation_config or {}
    ids = {}
    for field, role in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
                        ("pad_token_id", "pad_id")):
        ids[field] = generation.get(field, getattr(tokenizer, role, None))
    if "text_config" in hf_config:
        return dict(hf_config, text_config=dict(hf_config["text_config"], **ids))
    return dict(hf_config, **ids)


def _with_dtype(hf_config: dict, dtype: str) -> dict:
    hf_config = dict(hf_config, dtype=dtype)
    for sub in ("text_config", "vision_config"):
        if sub in hf_config:
            hf_config[sub] = dict(hf_config[sub], dtype=dtype)
    return hf_config


# ----------------------------------------------------------------------------- self-check

def _probe_image(size: int):
    """A random RGB image of another size than the model's, so the processor resizes it."""
    from PIL import Image
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size + 7, size + 3, 3), dtype=np.uint8))


def _probe_inputs(result: ExportResult, config: VLMConfig, tokenizer,
                  chat: ChatSettings = ChatSettings()) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int[1, T], pixel_values f32[k, 3, S, S]): through the exported processor when
    there is one (which checks it too: k = 1, or a tiled model's tiles), else random ids around
    one image's tokens."""
    per_image = config.tokens_per_image
    if not result.processor:
        rng = np.random.default_rng(0)
        text = [t for t in rng.integers(0, config.llm.vocab_size, 12) if t != config.image_token_id]
        ids = np.array([text[:4] + [config.image_token_id] * per_image + text[4:]])
        pixels = rng.uniform(-1, 1, (1, 3, config.vision.image_size, config.vision.image_size))
        return ids, pixels.astype(np.float32)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(result.out, trust_remote_code=_remote_code(result))
    image = _probe_image(config.vision.image_size)
    batch = processor(images=image, text=_PROBE_TEXT, return_tensors="np")
    ids, pixels = np.asarray(batch["input_ids"]), np.asarray(batch["pixel_values"], np.float32)
    ours, grid = _our_images(image, config, chat)
    got_tokens = int((ids == config.image_token_id).sum())
    if got_tokens != per_image * len(ours):
        raise ExportMismatch(f"the exported processor expands <image> to {got_tokens} tokens, the "
                             f"model reads {per_image} per image x {len(ours)} image(s)")
    _check_pixels(pixels, image, config, chat)
    text_ids = [i for i in ids[0].tolist() if i != config.image_token_id]
    want_ids = [i for i in _our_probe_ids(tokenizer, config, grid).tolist()
                if i != config.image_token_id]
    if text_ids[-len(want_ids):] != want_ids:
        raise ExportMismatch(f"the exported tokenizer gives ids {text_ids} for the probe text, "
                             f"ours {want_ids}")
    return ids, pixels


def _rounded(params: Any, dtype: str) -> Any:
    """Params as the exported file holds them, back in f32 (our model computes in f32)."""
    return jax.tree.map(lambda x: np.asarray(x, np.float32).astype(EXPORT_DTYPES[dtype])
                        .astype(np.float32), params)


def _compare(result: ExportResult, ours_exact: np.ndarray, ours_f32: np.ndarray,
             theirs: np.ndarray, what: str) -> ExportResult:
    diff = float(np.abs(ours_exact - theirs).max())
    if not diff <= F32_TOLERANCE:
        raise ExportMismatch(f"{what}: transformers and vlm_jax disagree on the probe input: max "
                             f"|diff| {diff:.3g} > {F32_TOLERANCE:g} (same weights, f32)")
    drift = bound = None
    if result.dtype == "bfloat16":
        drift = float(np.abs(ours_f32 - theirs).max())
        bound = BF16_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ours_f32).max()))
        if not drift <= bound:
            raise ExportMismatch(f"{what}: bf16 weights move the outputs by max |diff| {drift:.3g} "
                                 f"> {bound:.3g} ({BF16_RELATIVE_TOLERANCE:g} x output scale)")
    return dataclasses.replace(result, max_abs_diff=diff, bf16_drift=drift, bf16_bound=bound)


def _remote_code(result: ExportResult) -> bool:
    """Whether `result.out` loads through its own code (the custom format)."""
    return result.format == "custom"


def check_llava_export(result: ExportResult, config: VLMConfig, params: Any,
                       tokenizer, chat: ChatSettings = ChatSettings()) -> ExportResult:
    """Load `result.out` as LlavaForConditionalGeneration (f32) and check it (`check_vlm`)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    hf_model, info = LlavaForConditionalGeneration.from_pretrained(
        result.out, dtype=torch.float32, output_loading_info=True)
    return check_vlm(result, hf_model, info, config, params, tokenizer, chat, "LLaVA logits")


def _load_eager(cls_name: str, out: str):
    """`out` loaded by transformers' class `cls_name` in f32 with eager attention (its exact
    masks: PaliGemma's bidirectional prefix), after checking no tensor is missing or extra."""
    import torch
    import transformers

    hf_model, info = getattr(transformers, cls_name).from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    _check_loading_info(info, out)
    return hf_model.eval()


def check_paligemma_export(result: ExportResult, config: VLMConfig, params: Any, tokenizer=None,
                           chat: ChatSettings = ChatSettings()) -> ExportResult:
    """Load `result.out` as PaliGemmaForConditionalGeneration and compare its logits with ours on
    a probe row with a bidirectional prefix (token_type_ids) and a causal suffix; with its
    processor, also the prompt, pixels and greedy answer (`check_answers`, prefix-LM)."""
    hf_model = _load_eager(hf_paligemma.ARCHITECTURE, result.out)
    exact = _rounded(params, result.dtype)
    ours_exact, ours_f32, theirs = hf_paligemma.probe_logits(
        hf_model, config, exact, exact if result.dtype == "float32" else params)
    result = _compare(result, ours_exact, ours_f32, theirs, "PaliGemma logits")
    if result.processor:
        result = check_answers(result, config, exact, tokenizer, chat, hf_model, prefix_lm=True)
    return result


def check_idefics3_export(result: ExportResult, config: VLMConfig, params: Any, tokenizer=None,
                          chat: ChatSettings = ChatSettings()) -> ExportResult:
    """Load `result.out` as Idefics3ForConditionalGeneration and compare its logits with ours on
    random ids around one single-tile image ([1, 1, 3, S, S], pixel mask all ones); with its
    processor, also the probe text's ids and pixels, and for a trained model the prompt and
    greedy answer (`check_answers`)."""
    hf_model = _load_eager(hf_idefics3.ARCHITECTURE, result.out)
    exact = _rounded(params, result.dtype)
    ours_exact, ours_f32, theirs = hf_idefics3.probe_logits(
        hf_model, config, exact, exact if result.dtype == "float32" else params)
    result = _compare(result, ours_exact, ours_f32, theirs, "Idefics3 logits")
    if result.processor:
        import torch
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(result.out)
        image = _probe_image(config.vision.image_size)
        batch = processor(images=image, text=_PROBE_TEXT, return_tensors="np")
        _, grid = _our_images(image, config, chat)
        want = _our_probe_ids(tokenizer, config, grid)
        if batch["input_ids"][0].tolist() != want.tolist():
            raise ExportMismatch(f"the exported Idefics3Processor gives ids "
                                 f"{batch['input_ids'][0].tolist()} for the probe text, ours "
                                 f"{want.tolist()}")
        pixels = np.asarray(batch["pixel_values"], np.float32)
        _check_pixels(pixels, image, config, chat)
        if grid is not None:  # the tiled probe through both models, as the processor gives it
            with torch.no_grad():
                theirs = hf_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
            tiles = pixels.reshape((-1,) + pixels.shape[2:])
            ours_exact, ours_f32 = _our_logits(config, params, result.dtype, batch["input_ids"],
                                               tiles)
            result = _compare(result, ours_exact, ours_f32, theirs, "Idefics3 logits (tiled)")
        if chat.template is not None:
            result = check_answers(result, config, exact, tokenizer, chat, hf_model)
    return result


def check_custom_export(result: ExportResult, config: VLMConfig, params: Any,
                        tokenizer, chat: ChatSettings = ChatSettings()) -> ExportResult:
    """Load `result.out` through its own code, as a transformers user does
    (`AutoModelForImageTextToText`, trust_remote_code), in f32, and check it (`check_vlm`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    hf_model, info = AutoModelForImageTextToText.from_pretrained(
        result.out, dtype=torch.float32, trust_remote_code=True, output_loading_info=True)
    if type(hf_model).__name__ != hf_custom.ARCHITECTURE:
        raise ExportMismatch(f"AutoModelForImageTextToText loads {result.out} as "
                             f"{type(hf_model).__name__}, not {hf_custom.ARCHITECTURE}")
    return check_vlm(result, hf_model, info, config, params, tokenizer, chat, "custom-format logits")


def check_vlm(result: ExportResult, hf_model, info: dict, config: VLMConfig, params: Any,
              tokenizer, chat: ChatSettings, what: str) -> ExportResult:
    """The loaded export (`info`: its loading report) against ours: no missing or unexpected
    tensors, logits on a probe input (through the exported processor when there is one); for a
    model with a trained chat template, also the greedy answer to a probe question, asked the way
    a transformers user asks it (`check_answers`)."""
    import torch

    _check_loading_info(info, result.out)
    ids, pixels = _probe_inputs(result, config, tokenizer, chat)
    with torch.no_grad():
        theirs = hf_model.eval()(input_ids=torch.tensor(ids),
                                 pixel_values=torch.tensor(pixels)).logits.numpy()
    ours_exact, ours_f32 = _our_logits(config, params, result.dtype, ids, pixels)
    result = _compare(result, ours_exact, ours_f32, theirs, what)
    if chat.template is not None and result.processor:
        result = check_answers(result, config, _rounded(params, result.dtype), tokenizer, chat,
                               hf_model)
    return result


def _our_logits(config: VLMConfig, params: Any, dtype: str, ids: np.ndarray,
                pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Our logits on HF-style inputs with the export's weights (rounded to `dtype`) and with
    the f32 ones (the same array for an f32 export)."""
    exact = LoadedModel(config, _rounded(params, dtype), None).logits(ids, pixels)
    if dtype == "float32":
        return exact, exact
    return exact, LoadedModel(config, params, None).logits(ids, pixels)


def _our_probe_ids(tokenizer, config: VLMConfig, grid: tuple[int, int] | None) -> np.ndarray:
    """The probe text's ids as our pipeline writes them (a tiled image: its layout)."""
    if grid is None:
        return tokenizer.expand_images(tokenizer.encode(_PROBE_TEXT), config.tokens_per_image)[0]
    return np.asarray(tokenizer.encode(tiling.expand_placeholders(
        _PROBE_TEXT, tokenizer.image_token, [grid], config.tokens_per_image)), np.int32)


def _our_images(image, config: VLMConfig, chat: ChatSettings):
    """(f32[k, S, S, 3], grid or None): the probe image as `vlm-jax generate` preprocesses it."""
    return tiling.model_images(np.asarray(image), config.vision.image_size, chat.pad_to_square,
                               chat.tiling)


def _check_pixels(theirs: np.ndarray, image, config: VLMConfig, chat: ChatSettings
                  ) -> np.ndarray:
    """The exported processor's pixel values (any leading axes, then 3 x S x S) must be ours;
    -> ours, f32[1, k, S, S, 3] as `generate` takes them (k = 1, or a tiled model's tiles)."""
    size = config.vision.image_size
    ours = _our_images(image, config, chat)[0][None]
    theirs = theirs.reshape(-1, 3, size, size)
    if theirs.shape[0] != ours.shape[1]:
        raise ExportMismatch(f"the exported image processor makes {theirs.shape[0]} images of the "
                             f"probe image, ours {ours.shape[1]}")
    diff = float(np.abs(ours[0].transpose(0, 3, 1, 2) - theirs).max())
    if diff > 1e-5:
        raise ExportMismatch(f"the exported image processor differs from ours: max |diff| "
                             f"{diff:.3g} in pixel values")
    return ours


def check_answers(result: ExportResult, config: VLMConfig, params: Any, tokenizer,
                  chat: ChatSettings, hf_model, prefix_lm: bool = False) -> ExportResult:
    """The exported processor's `apply_chat_template` + default call must give exactly our
    prompt ids (one BOS, the image expanded) and pixel values, and transformers' greedy
    `generate` exactly our greedy answer, stopping where ours stops (on the probe image,
    ANSWER_TOKENS at most). `prefix_lm`: the prompt attends bidirectionally (PaliGemma: the
    processor's token_type_ids)."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(result.out, trust_remote_code=_remote_code(result))
    image = _probe_image(config.vision.image_size)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": _PROBE_QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    ours_ids = prompt_ids(tokenizer, _PROBE_QUESTION, chat.template, config.tokens_per_image,
                          _our_images(image, config, chat)[1])
    theirs_ids = inputs["input_ids"][0].tolist()
    if theirs_ids != ours_ids.tolist():
        raise ExportMismatch(f"the exported processor's chat template gives prompt ids "
                             f"{theirs_ids}, vlm-jax generate gives {ours_ids.tolist()}")
    pixels = _check_pixels(inputs["pixel_values"].numpy(), image, config, chat)
    with torch.no_grad():
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=ANSWER_TOKENS)
    theirs = out[0, len(theirs_ids):].tolist()
    stops = stop_token_ids(tokenizer, chat.template)
    tokens, lengths = greedy_generate(config, params, ours_ids[None], np.array([len(ours_ids)]),
                                      pixels, ANSWER_TOKENS, stops,
                                      np.array([len(ours_ids)]) if prefix_lm else None)
    ours = tokens[0, :lengths[0]].tolist()  # ours stops before the stop token, theirs after it
    if len(ours) == ANSWER_TOKENS:
        same = theirs == ours
    else:
        same = bool(theirs) and theirs[:-1] == ours and theirs[-1] in stops
    if not same:
        raise ExportMismatch(f"greedy answers differ: transformers {theirs}, vlm-jax {ours} "
                             f"(stop tokens {stops})")
    return dataclasses.replace(result, answer_tokens=len(ours))


def check_vision_export(result: ExportResult, config: VLMConfig, params: Any,
                        tokenizer=None) -> ExportResult:
    """Load `result.out` as SiglipVisionModel and compare last_hidden_state (and the pooled
    embedding when the tower has a head) with ours."""
    import torch
    from transformers import SiglipVisionModel

    hf_model, info = SiglipVisionModel.from_pretrained(result.out, dtype=torch.float32,
                                                       output_loading_info=True)
    _check_loading_info(info, result.out)
    size = config.vision.image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        hf_out = hf_model.eval()(pixel_values=torch.tensor(pixels))
    theirs = [hf_out.last_hidden_state.numpy()]
    if config.vision.use_head:
        theirs.append(hf_out.pooler_output.numpy())
    tower = SiglipVisionTower(config.vision)
    images = jax.numpy.asarray(pixels.transpose(0, 2, 3, 1))

    def ours(vision_params):
        hidden, pooled = tower.apply({"params": vision_params}, images, method="encode")
        return [np.asarray(hidden)] + ([np.asarray(pooled)] if config.vision.use_head else [])

    exact = ours(_rounded(params["vision_tower"], result.dtype))
    f32 = exact if result.dtype == "float32" else ours(params["vision_tower"])
    flat = lambda xs: np.concatenate([x.reshape(-1) for x in xs])  # noqa: E731
    return _compare(result, flat(exact), flat(f32), flat(theirs), "SigLIP vision outputs")


def check_llm_export(result: ExportResult, config: VLMConfig, params: Any) -> ExportResult:
    """Load `result.out` as AutoModelForCausalLM (f32): the family's own class, no missing or
    unexpected tensors, and the logits of random ids equal to ours."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_model, info = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32,
                                                          output_loading_info=True)
    _check_loading_info(info, result.out)
    want = hf_llm.decoder_config_to_hf(config.llm)["architectures"][0]
    if type(hf_model).__name__ != want:
        raise ExportMismatch(f"AutoModelForCausalLM loads {result.out} as "
                             f"{type(hf_model).__name__}, not {want}")
    ids = np.random.default_rng(0).integers(0, config.llm.vocab_size, (1, 16))
    with torch.no_grad():
        theirs = hf_model.eval()(input_ids=torch.tensor(ids)).logits.numpy()
    llm_only = dataclasses.replace(config, vision=None, projector=None, text_tower=None)
    llm_params = {"llm": params["llm"]}
    ours_exact, ours_f32 = _our_logits(llm_only, llm_params, result.dtype, ids)
    return _compare(result, ours_exact, ours_f32, theirs, "causal-LM logits")


def _check_loading_info(info: dict, out: str) -> None:
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(k)}
    if problems:
        raise ExportMismatch(f"transformers loads {out} with {json.dumps(problems, default=str)}")


def describe(result: ExportResult) -> str:
    """One line for the CLI: what was written and how well it matched."""
    kind = {"llava": "LlavaForConditionalGeneration",
            "paligemma": hf_paligemma.ARCHITECTURE,
            "idefics3": hf_idefics3.ARCHITECTURE,
            "custom": f"{hf_custom.ARCHITECTURE}, load with trust_remote_code=True",
            None: "SiglipVisionModel" if result.part == "vision" else "*ForCausalLM"}[result.format]
    line = (f"wrote {result.out} ({kind}, {result.dtype} weights); self-check, f32 compute "
            f"on both sides: max |diff| {result.max_abs_diff:.3g} <= {result.tolerance:g} vs "
            f"transformers")
    if result.bf16_drift is not None:
        line += (f"; bf16 rounding moves outputs by {result.bf16_drift:.3g} "
                 f"(bound {result.bf16_bound:.3g} = {BF16_RELATIVE_TOLERANCE:g} x output scale)")
    if result.answer_tokens is not None:
        line += (f"; the same greedy answer ({result.answer_tokens} tokens) through its "
                 f"processor's chat template and generate")
    elif result.part == "vlm" and result.processor:
        line += "; answers not compared (no trained chat template: an untrained import)"
    if result.no_processor is not None:
        line += f"; tokenizer files only, no processor: {result.no_processor}"
    elif result.part == "vlm" and not result.processor:
        line += "; no tokenizer in the checkpoint: no tokenizer/processor files written"
    if result.left_out:
        line += (f"; not exported (no transformers VLM has them; they stay in the model "
                 f"directory): {', '.join(f'{k}/' for k in result.left_out)}")
    return line
