"""Per-example transforms: RAW EXAMPLE -> TOKENIZED EXAMPLE (see the data contract), as grain Maps.

    DecodeImages(image_size)                       images -> f32[k, S, S, 3] in [-1, 1]
    TokenizeConversation(tokenizer, template, num_image_tokens, seq_len, prefix_lm=False)
    TokenizeCaption(tokenizer, num_image_tokens, seq_len)     the "plain" alignment format
    TokenizeText(tokenizer, seq_len, template)                text-only LM examples
    TokenizeContrastive(tokenizer, text_len)                  image + padded caption ids

Compose them with `Chain(...)` or get the chain a pipeline config asks for from
`make_transform(cfg, tokenizer)`. Bad records raise `SkipExample` with a stable reason:
"placeholder_mismatch", "too_long", "no_answer", "no_conversation", "no_caption",
"conversation_malformed" (plus the image reasons of `images.decode_image`).

Loss mask: the whole rendered prompt is encoded in one call (so the ids are exactly what the
tokenizer gives for the template's text, as at inference), and a token is a target when its
first character lies in a target piece of the template (an answer or its end-of-turn token).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import decode_image, preprocess_image
from vlm_jax.data.templates import ChatTemplate, Piece, TemplateError, get_template
from vlm_jax.data.tokenizer import Tokenizer


class DecodeImages(grain.transforms.Map):
    """images: list of bytes / PIL / uint8 arrays -> f32[k, S, S, 3] SigLIP-normalised."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, element: Mapping[str, Any]) -> dict:
        images = [preprocess_image(decode_image(image), self.image_size)
                  for image in element["images"]]
        stacked = (np.stack(images) if images
                   else np.zeros((0, self.image_size, self.image_size, 3), np.float32))
        return {**element, "images": stacked.astype(np.float32, copy=False)}


class TokenizeConversation(grain.transforms.Map):
    """A conversation with `<image>` placeholders -> input_ids / target_ids / loss_mask /
    positions / mask_ar (+ the decoded images), through a chat template.

    Each `<image>` becomes `num_image_tokens` copies of `tokenizer.image_token_id`. Examples
    longer than `seq_len` are dropped ("too_long"); with `truncate=True` they are cut at seq_len
    instead, but only where the cut keeps every image token and at least one answer token.
    `prefix_lm=True` (PaliGemma style): every token before the first answer token gets
    mask_ar = 0 (one bidirectional block: images and the first prompt), the rest 1.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate, num_image_tokens: int,
                 seq_len: int, prefix_lm: bool = False, truncate: bool = False):
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.num_image_tokens = num_image_tokens
        self.seq_len = seq_len
        self.prefix_lm = prefix_lm
        self.truncate = truncate
        tokenizer.image_token_id  # fails now, with its fix, rather than on the first example

    def map(self, element: Mapping[str, Any]) -> dict:
        conversation = element.get("conversation")
        if not conversation:
            raise SkipExample("no_conversation", str(element.get("id")))
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        if not any(isinstance(a, str) and a.strip() for a in answers):
            raise SkipExample("no_answer", f"{element.get('id')}: no non-empty assistant turn")
        return self._tokenize(element, conversation)

    def _tokenize(self, element: Mapping[str, Any], conversation: Sequence[Mapping]) -> dict:
        try:
            pieces = self.template.render(conversation, self.tokenizer.bos_token,
                                          self.tokenizer.eos_token)
        except TemplateError as error:
            raise SkipExample("conversation_malformed", f"{element.get('id')}: {error}") from None
        images = _decoded_images(element)
        example = tokenize_pieces(self.tokenizer, pieces, num_images=len(images),
                                  num_image_tokens=self.num_image_tokens, seq_len=self.seq_len,
                                  prefix_lm=self.prefix_lm, truncate=self.truncate,
                                  example_id=str(element.get("id")))
        if isinstance(images, np.ndarray):
            example["images"] = images
        return example


class TokenizeCaption(TokenizeConversation):
    """Image-caption pairs in LLaVA's "plain" alignment format: `<image>\\n` per image, then the
    caption and EOS; the loss falls on the caption and EOS only. The caption is the example's
    `caption`, else its single assistant turn (LLaVA's pretraining JSON stores it there)."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int, seq_len: int,
                 prefix_lm: bool = False, truncate: bool = False):
        super().__init__(tokenizer, "plain", num_image_tokens, seq_len, prefix_lm, truncate)

    def map(self, element: Mapping[str, Any]) -> dict:
        caption = caption_of(element)
        num_images = len(element["images"])
        conversation = [{"role": "user", "content": self.tokenizer.image_token * num_images},
                        {"role": "assistant", "content": caption}]
        return self._tokenize(element, conversation)


class TokenizeText(grain.transforms.Map):
    """Text-only LM examples: BOS + caption + EOS, or a conversation rendered with `template`;
    every token is learned. Output has no images. Too long -> "too_long" (or cut, `truncate`)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int,
                 template: str | ChatTemplate | None = None, truncate: bool = False):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.template = get_template(template) if isinstance(template, str) else template
        self.truncate = truncate

    def map(self, element: Mapping[str, Any]) -> dict:
        bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        if element.get("caption") is not None:
            text = bos + element["caption"] + eos
        elif element.get("conversation") and self.template is not None:
            try:
                text = self.template.text(element["conversation"], bos, eos)
            except TemplateError as error:
                raise SkipExample("conversation_malformed", f"{element.get('id')}: {error}") from None
        else:
            raise SkipExample("no_text", f"{element.get('id')}: no caption, and no conversation "
                              "with a template to render it")
        return tokenize_pieces(self.tokenizer, [(text, True)], num_images=0, num_image_tokens=0,
                               seq_len=self.seq_len, truncate=self.truncate,
                               example_id=str(element.get("id")))


class TokenizeContrastive(grain.transforms.Map):
    """Image + caption -> {"images": f32[k, S, S, 3], "text_ids": i32[text_len]}.

    The caption is truncated to fit text_len (fine for contrastive captions: the text tower sees
    a prefix), and EOS is kept as the last real token ("sticky", as in big_vision's SigLIP), then
    padded with pad_id. The one-image rule is the pipeline's check ("image_count").
    """

    def __init__(self, tokenizer: Tokenizer, text_len: int):
        if tokenizer.pad_id is None:
            raise ValueError("TokenizeContrastive pads captions: the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.text_len = text_len

    def map(self, element: Mapping[str, Any]) -> dict:
        ids = self.tokenizer.encode(caption_of(element))
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = ids[:self.text_len - len(eos)] + eos
        text_ids = np.full((self.text_len,), self.tokenizer.pad_id, np.int32)
        text_ids[:len(ids)] = ids
        example = {"text_ids": text_ids}
        images = _decoded_images(element)
        if isinstance(images, np.ndarray):
            example["images"] = images
        return example


class Chain(grain.transforms.Map):
    """Apply transforms in order (a picklable callable for any grain map or a plain loop)."""

    def __init__(self, *transforms: grain.transforms.Map):
        self.transforms = transforms

    def map(self, element: Mapping[str, Any]) -> dict:
        for transform in self.transforms:
            element = transform.map(element)
        return element

    def __call__(self, element: Mapping[str, Any]) -> dict:
        return self.map(element)


def make_transform(cfg: Any, tokenizer: Tokenizer, prefix_lm: bool = False) -> Chain:
    """The chain for a pipeline `DataConfig` (task, template, seq_len, image_size,
    num_image_tokens, text_len)."""
    decode = DecodeImages(cfg.image_size)
    if cfg.task == "instruct":
        return Chain(decode, TokenizeConversation(tokenizer, cfg.template, cfg.num_image_tokens,
                                                  cfg.seq_len, prefix_lm=prefix_lm))
    if cfg.task == "align":
        return Chain(decode, TokenizeCaption(tokenizer, cfg.num_image_tokens, cfg.seq_len,
                                             prefix_lm=prefix_lm))
    if cfg.task == "lm":
        return Chain(TokenizeText(tokenizer, cfg.seq_len, cfg.template))
    if cfg.task == "contrastive":
        return Chain(decode, TokenizeContrastive(tokenizer, cfg.text_len))
    raise ValueError(f"task={cfg.task!r}; supported: instruct, align, lm, contrastive")


# ---------------------------------------------------------------------- the tokenizing core

def tokenize_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece], num_images: int,
                    num_image_tokens: int, seq_len: int, prefix_lm: bool = False,
                    truncate: bool = False, example_id: str = "") -> dict[str, np.ndarray]:
    """Template pieces -> the TOKENIZED EXAMPLE arrays (without images)."""
    text = "".join(segment for segment, _ in pieces)
    char_is_target = np.zeros(len(text) + 1, bool)
    start = 0
    for segment, is_target in pieces:
        char_is_target[start:start + len(segment)] = is_target
        start += len(segment)
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids = np.asarray(ids, np.int32)
    is_target = char_is_target[np.asarray([s for s, _ in offsets], np.int64).reshape(-1)]

    if num_images or num_image_tokens:
        is_image = ids == tokenizer.image_token_id
        if int(is_image.sum()) != num_images:
            raise SkipExample("placeholder_mismatch", f"{example_id}: {int(is_image.sum())} "
                              f"{tokenizer.image_token} placeholders for {num_images} images")
        repeats = np.where(is_image, num_image_tokens, 1)
        ids, is_target = np.repeat(ids, repeats), np.repeat(is_target & ~is_image, repeats)
        is_image = np.repeat(is_image, repeats)
    else:
        is_image = np.zeros(len(ids), bool)

    if not is_target[1:].any():
        raise SkipExample("no_answer", f"{example_id}: no answer token to learn")
    if len(ids) > seq_len:
        last_image = int(np.flatnonzero(is_image)[-1]) if is_image.any() else -1
        if not (truncate and last_image < seq_len and is_target[1:seq_len].any()):
            raise SkipExample("too_long", f"{example_id}: {len(ids)} tokens > seq_len {seq_len}")
        ids, is_target = ids[:seq_len], is_target[:seq_len]

    n = len(ids)
    mask_ar = np.ones(n, np.int32)
    if prefix_lm:
        mask_ar[:int(np.argmax(is_target))] = 0
    return {
        "input_ids": ids,
        "target_ids": np.append(ids[1:], 0).astype(np.int32),
        "loss_mask": np.append(is_target[1:], False).astype(np.float32),
        "positions": np.arange(n, dtype=np.int32),
        "mask_ar": mask_ar,
    }


def caption_of(element: Mapping[str, Any]) -> str:
    """The example's caption, else its single assistant turn; "no_caption" otherwise."""
    if element.get("caption") is not None:
        return element["caption"]
    answers = [m["content"] for m in element.get("conversation") or []
               if m["role"] == "assistant"]
    if len(answers) == 1 and answers[0].strip():
        return answers[0]
    raise SkipExample("no_caption", f"{element.get('id')}: no caption and {len(answers)} "
                      "assistant turns")


def _decoded_images(element: Mapping[str, Any]) -> np.ndarray | list:
    """The f32[k, S, S, 3] images DecodeImages made; [] for text-only examples."""
    images = element.get("images", [])
    if isinstance(images, np.ndarray) or len(images) == 0:
        return images
    raise ValueError(f"{element.get('id')}: images are not decoded; run DecodeImages before "
                     "tokenizing (e.g. Chain(DecodeImages(size), TokenizeConversation(...)))")
