"""The files beside the weights that make transformers answer as we do (`exporter.py`, both
VLM formats): the tokenizer (with `<image>`) and a processor that preprocesses images and expands
`<image>` as our pipeline does, the chat template the model was trained with, and
generation_config.json with the stop tokens our `generate` stops at.

LLaVA: transformers' LlavaProcessor. Idefics3: an Idefics3Processor for single-tile images (the
layout `Tokenizer.image_wrap` records for an Idefics3 import). PaliGemma: a PaliGemmaProcessor (SigLIP image processor,
`image_seq_length` tokens per image) for a model that reads the "paligemma" template, the only
layout that processor writes (`processor_blocker` says why not otherwise). Custom: the same
tokenizer, image processor and chat template under a VlmJaxProcessor (custom_hf/processing_vlm_jax.py), which expands `<image>` to
`tokens_per_image` tokens whatever the projector (LlavaProcessor counts patches).
"""
from __future__ import annotations

import dataclasses
import json
import os

from vlm_jax.convert import hf_custom
from vlm_jax.data.templates import PALIGEMMA_PROCESSOR_JINJA, get_template
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP
from vlm_jax.errors import ConversionError
from vlm_jax.inference.prompts import stop_token_ids
from vlm_jax.models.vlm import VLMConfig


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """What the model was trained to read, for the processor and generation config."""
    template: str | None = None          # our chat template name (vlm_jax/data/templates.py)
    pad_to_square: bool = False          # LLaVA-1.5's expand2square before the resize
    generation_config: dict | None = None  # the imported LLM's HF generation config
    tiling: TilingConfig = TilingConfig()  # large images as tiles (data/tiling.py)


def write_processor(out: str, config: VLMConfig, tokenizer, chat: ChatSettings,
                    fmt: str) -> None:
    """Tokenizer files with `<image>` + a LlavaProcessor whose image processor matches
    `data/images.preprocess_image` (optional pad to a square with the mean colour, bicubic resize
    to S x S, x / 127.5 - 1) and whose chat template renders our training prompts; for the
    custom format (`fmt`), turned into a VlmJaxProcessor (`_make_processor_custom`)."""
    from transformers import AutoTokenizer, LlavaImageProcessorPil, LlavaProcessor

    image_token_id = tokenizer.token_to_id(tokenizer.image_token)
    if image_token_id != config.image_token_id:
        raise ConversionError(f"the tokenizer maps {tokenizer.image_token} to {image_token_id} but the "
                              f"model's image_token_id is {config.image_token_id}")
    chat_template = chat_template_of(tokenizer, chat)
    kept = tokenizer.chat_template
    tokenizer.chat_template = chat_template  # the tokenizer files carry the same template
    try:
        tokenizer.save(out)
    finally:
        tokenizer.chat_template = kept
    # A custom export's config.json (read for the tokenizer class) names its own code.
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=fmt == "custom")
    size = config.vision.image_size
    if fmt == "paligemma":
        _write_paligemma_processor(out, config, hf_tokenizer, chat)
        return
    if fmt == "idefics3" or (fmt == "custom" and chat.tiling.enabled):
        # A tiled custom export: Idefics3's splitting image processor under VlmJaxTiledProcessor.
        _write_idefics3_processor(out, config, hf_tokenizer, chat_template, chat.tiling)
        if fmt == "custom":
            _make_processor_custom(out, config, tiled=True)
        return
    # The PIL backend: its bicubic resize is PIL's, as ours (the torchvision one differs).
    image_processor = LlavaImageProcessorPil(
        do_pad=chat.pad_to_square, size={"height": size, "width": size}, do_center_crop=False,
        resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tokenizer,
                               patch_size=config.vision.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select,
                               image_token=tokenizer.image_token, num_additional_image_tokens=0,
                               chat_template=chat_template)
    processor.save_pretrained(out)
    if fmt == "custom":
        _make_processor_custom(out, config)


def processor_blocker(fmt: str, chat: ChatSettings, tokenizer=None) -> str | None:
    """Why the processor of `fmt` cannot give this model its inputs, or None. Each takes any
    chat template but one image layout (`tokenizer.image_wrap`): LLaVA's and ours the bare run of
    image tokens, Idefics3's its wrapped one; PaliGemmaProcessor writes one prompt layout too, and
    neither it nor Idefics3's pads images to a square."""
    wrap = tuple(tokenizer.image_wrap) if tokenizer is not None else ("", "")
    wanted = IDEFICS3_IMAGE_WRAP if fmt == "idefics3" else ("", "")
    if chat.tiling.enabled:
        if fmt not in ("idefics3", "custom"):
            return (f"the model reads large images as tiles (data.tiling.max_tiles="
                    f"{chat.tiling.max_tiles}); the {fmt} processor does not tile (--format "
                    f"idefics3 for a model composed like Idefics3, else --format custom)")
        if chat.pad_to_square:
            return ("the model was trained with data.pad_to_square=True; Idefics3's image "
                    "processor, which cuts the tiles, does not pad")
        return None  # the tiled layout is Idefics3's whatever image_wrap says (data/tiling.py)
    if wrap != wanted:
        return (f"the tokenizer writes each image as {wrap[0]!r} + image tokens + {wrap[1]!r} "
                f"(its image_wrap), the {fmt} processor as {wanted[0]!r} + image tokens + "
                f"{wanted[1]!r}")
    if fmt == "idefics3" and chat.pad_to_square:
        return ("the model was trained with data.pad_to_square=True; Idefics3's image processor "
                "(no tiling) resizes without padding")
    if fmt != "paligemma":
        return None
    if chat.template != "paligemma":
        trained = (f"was trained with data.template={chat.template!r}" if chat.template else
                   "records no template (a PaliGemma import from before the 'paligemma' "
                   "template: import it again)")
        return (f"the model {trained}; PaliGemmaProcessor writes only the 'paligemma' layout "
                f"(images, BOS, prefix, newline)")
    if chat.pad_to_square:
        return ("the model was trained with data.pad_to_square=True; PaliGemma's SigLIP image "
                "processor resizes without padding")
    return None


def _write_paligemma_processor(out: str, config: VLMConfig, hf_tokenizer,
                               chat: ChatSettings) -> None:
    """PaliGemmaProcessor: SigLIP's PIL image processor (bicubic resize to S x S,
    x / 127.5 - 1, as `preprocess_image`) with `image_seq_length` = tokens per image, and a chat
    template that renders what the processor is given (it adds BOS and the closing newline).
    Like PaliGemma's own, the processor adds the <locNNNN> / <segNNN> tokens to the tokenizer if
    it lacks them (ids past the model's vocabulary: a tiny model never sees them)."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    why = processor_blocker("paligemma", chat)
    if why is not None:
        raise ConversionError(f"no PaliGemmaProcessor for this model: {why}")
    size = config.vision.image_size
    image_processor = SiglipImageProcessorPil(
        do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_convert_rgb=True)
    image_processor.image_seq_length = config.tokens_per_image
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                   chat_template=PALIGEMMA_PROCESSOR_JINJA)
    processor.save_pretrained(out)


def _write_idefics3_processor(out: str, config: VLMConfig, hf_tokenizer,
                              chat_template: str | None, tiling: TilingConfig) -> None:
    """Idefics3Processor. For one tile per image: no image splitting and no first resize, so
    its image processor resizes straight to S x S (PIL bicubic, x / 127.5 - 1, as
    `preprocess_image`; pixel_attention_mask all ones), and each `<image>` becomes
    IDEFICS3_IMAGE_WRAP around `image_seq_len` = tokens-per-image image tokens, as our
    tokenizer's `expand_images` writes it. For a tiled model (data.tiling.max_tiles = n * n):
    Idefics3's own splitting, longest edge n * S then tiles of S (PIL Lanczos), which is the
    rule data/tiling.py implements, and its layout. The chat template is the model's."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    size = config.vision.image_size
    if tiling.enabled:
        resize = dict(do_resize=True, size={"longest_edge": tiling.side * size},
                      do_image_splitting=True, resample=1)  # PIL LANCZOS
    else:
        resize = dict(do_resize=False, do_image_splitting=False, resample=3)
    image_processor = Idefics3ImageProcessorPil(
        max_image_size={"longest_edge": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
        do_convert_rgb=True, **resize)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                  image_seq_len=config.tokens_per_image,
                                  chat_template=chat_template)
    processor.save_pretrained(out)


def chat_template_of(tokenizer, chat: ChatSettings) -> str | None:
    """The Jinja template of the template the model was trained with; for an untrained import,
    the LLM's own (kept by the import), which our `generate` does not use by default."""
    if chat.template is not None:
        return get_template(chat.template).jinja
    return tokenizer.chat_template


def write_generation_config(out: str, tokenizer, chat: ChatSettings) -> None:
    """generation_config.json: the imported LLM's, with the stop tokens our `generate` uses
    (EOS and the template's end-of-turn token) so transformers' `generate` stops where we do."""
    generation = dict(chat.generation_config or {})
    imported_eos = generation.get("eos_token_id")
    imported_eos = [] if imported_eos is None else (
        [imported_eos] if isinstance(imported_eos, int) else list(imported_eos))
    stops = list(dict.fromkeys(stop_token_ids(tokenizer, chat.template) + imported_eos))
    for key, value in (("bos_token_id", tokenizer.bos_id), ("pad_token_id", tokenizer.pad_id)):
        if value is not None:
            generation[key] = value
    if stops:
        generation["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    generation.pop("transformers_version", None)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)


def _make_processor_custom(out: str, config: VLMConfig, tiled: bool = False) -> None:
    """Turn the LlavaProcessor files `write_processor` saved into VlmJaxProcessor ones:
    the same tokenizer, image processor and chat template, but `<image>` expands to
    `tokens_per_image` tokens whatever the projector (LlavaProcessor counts patches). `tiled`:
    the Idefics3Processor files of a tiled model into VlmJaxTiledProcessor ones (its splitting
    image processor and layout, pixel values as [num_tiles, 3, S, S] for our model's code)."""
    path = os.path.join(out, "processor_config.json")
    with open(path) as f:
        processor = json.load(f)
    for other_only in ("patch_size", "vision_feature_select_strategy",
                       "num_additional_image_tokens", "image_seq_len"):
        processor.pop(other_only, None)
    name = hf_custom.TILED_PROCESSOR_CLASS if tiled else hf_custom.PROCESSOR_CLASS
    processor.update(processor_class=name,
                     auto_map={"AutoProcessor": f"processing_vlm_jax.{name}"},
                     image_seq_length=config.tokens_per_image)
    with open(path, "w") as f:
        json.dump(processor, f, indent=2)
    tokenizer_path = os.path.join(out, "tokenizer_config.json")
    if os.path.exists(tokenizer_path):
        with open(tokenizer_path) as f:
            tokenizer_config = json.load(f)
        if "processor_class" in tokenizer_config:
            tokenizer_config["processor_class"] = name
            with open(tokenizer_path, "w") as f:
                json.dump(tokenizer_config, f, indent=2)
