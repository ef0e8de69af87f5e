"""Per-example transforms: RAW EXAMPLE -> TOKENIZED EXAMPLE (see the data contract), as grain Maps.

    DecodeImages(image_size, pad_to_square=False)  images -> u8[k, S, S, 3] (resized, not normalised)
    TokenizeConversation(tokenizer, template, num_image_tokens, seq_len, prefix_lm=False,
                         truncate=False)
    TokenizeCaption(tokenizer, num_image_tokens, seq_len, truncate=False)  LLaVA's "plain" format
    TokenizeText(tokenizer, seq_len, template, truncate=False)             text-only LM examples
    TokenizeContrastive(tokenizer, text_len[, negatives])     image + padded caption ids

Compose them with `Chain(...)` or get the chain a pipeline config asks for from
`make_transform(cfg, tokenizer)` (`data.too_long="truncate"` sets `truncate`, `data.pad_to_square`
the LLaVA-1.5 padding). Bad records raise `SkipExample` with a stable reason:
"placeholder_mismatch", "too_long", "no_answer", "no_conversation", "no_caption",
"conversation_malformed", "no_text", "no_negative_captions" (plus the image reasons of `images.decode_image`).

Loss mask: the whole rendered prompt is encoded in one call (so the ids are exactly what the
tokenizer gives for the template's text, as at inference), and a token is a target when its
first character lies in a target piece of the template (an answer or its end-of-turn token).

Too long for seq_len: skipped ("too_long"), or with `truncate=True` made to fit without ever
dropping an image token or cutting template markup (see `TokenizeConversation`): a conversation
keeps its longest prefix of whole (user, assistant) exchanges; when not even the first exchange
(holding every image) fits, or for a caption / a text-only row, the last answer's tokens are cut
at seq_len. A cut example carries `truncated: i32[] = 1` (absent on uncut examples); the skip
accounting counts it, packing ignores it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import decode_image, resize_image
from vlm_jax.data.templates import ChatTemplate, Message, Piece, TemplateError, get_template
from vlm_jax.data.tiling import TilingConfig, layout_text, tile_image
from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP, Tokenizer
from vlm_jax.errors import ConfigError


class DecodeImages(grain.transforms.Map):
    """images: list of bytes / PIL / uint8 arrays -> u8[k, S, S, 3] resized, each first padded to
    a square of `images.PAD_COLOR` with `pad_to_square` (LLaVA-1.5). They stay bytes to the
    device, where the train step normalises them (`images.normalize_pixels`)."""

    def __init__(self, image_size: int, pad_to_square: bool = False,
                 tiling: TilingConfig | None = None):
        self.image_size = image_size
        self.pad_to_square = pad_to_square
        self.tiling = tiling if tiling is not None and tiling.enabled else None

    def map(self, element: Mapping[str, Any]) -> dict:
        if self.tiling is not None:
            return self._tiled(element)
        images = [resize_image(decode_image(image), self.image_size, self.pad_to_square)
                  for image in element["images"]]
        stacked = (np.stack(images) if images
                   else np.zeros((0, self.image_size, self.image_size, 3), np.uint8))
        return {**element, "images": stacked}

    def _tiled(self, element: Mapping[str, Any]) -> dict:
        """data.tiling: every image -> its tiles and global view (data/tiling.py), all of them
        in one u8[k, S, S, 3] in reading order, and `image_grids` i32[num_images, 2] (rows,
        cols; (0, 0) for an image not split) for the tokenizer's layout."""
        tiles, grids = [np.zeros((0, self.image_size, self.image_size, 3), np.uint8)], []
        for image in element["images"]:
            image_tiles, grid = tile_image(decode_image(image), self.image_size, self.tiling,
                                           self.pad_to_square)
            tiles.append(image_tiles)
            grids.append(grid)
        return {**element, "images": np.concatenate(tiles),
                "image_grids": np.asarray(grids, np.int32).reshape(-1, 2)}


class TokenizeConversation(grain.transforms.Map):
    """A conversation with `<image>` placeholders -> input_ids / target_ids / loss_mask /
    positions / mask_ar (+ the decoded images), through a chat template.

    Each `<image>` becomes `num_image_tokens` copies of `tokenizer.image_token_id`. Examples
    longer than `seq_len` are dropped ("too_long"), unless `truncate=True`:
      * the row keeps the longest prefix of whole (user, assistant) exchanges (after the optional
        system turn) that fits, rendered by the template as that shorter conversation, so the kept
        text is exactly the template's, end-of-turn tokens included. The prefix always holds every
        `<image>` of the row; a binary search over the number of exchanges keeps a 40-turn row
        to a few tokenizations (lengths grow with the number of exchanges);
      * when not even the shortest prefix holding every image fits, its last answer is cut at
        seq_len, provided the cut falls inside that answer (after every image token, at least
        one answer token kept); otherwise the row is "too_long".
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

    def _tokenize(self, element: Mapping[str, Any], conversation: Sequence[Message]) -> dict:
        images = _decoded_images(element)
        num_images = _num_source_images(element)
        try:
            example = self._tokenize_messages(element, conversation, num_images, cut=False)
        except SkipExample as skip:
            if not (self.truncate and skip.reason == "too_long"):
                raise
            example = self._longest_fitting_prefix(element, conversation, num_images, skip)
            example["truncated"] = np.int32(1)
        if isinstance(images, np.ndarray):
            example["images"] = images
        return example

    def _tokenize_messages(self, element: Mapping[str, Any], messages: Sequence[Message],
                           num_images: int, cut: bool) -> dict:
        try:
            pieces = self.template.render(messages, self.tokenizer.bos_token,
                                          self.tokenizer.eos_token)
        except TemplateError as error:
            raise SkipExample("conversation_malformed", f"{element.get('id')}: {error}") from None
        return tokenize_pieces(self.tokenizer, pieces, num_images=num_images,
                               num_image_tokens=self.num_image_tokens, seq_len=self.seq_len,
                               prefix_lm=self.prefix_lm, truncate=cut,
                               example_id=str(element.get("id")),
                               image_layouts=_image_layouts(element, self.tokenizer,
                                                            self.num_image_tokens))

    def _longest_fitting_prefix(self, element: Mapping[str, Any],
                                conversation: Sequence[Message], num_images: int,
                                too_long: SkipExample) -> dict:
        """The `truncate=True` path of a conversation that does not fit (see the class)."""
        head = list(conversation[:1]) if conversation[0]["role"] == "system" else []
        turns = list(conversation[len(head):])

        def prefix(num_exchanges: int) -> list:
            return head + turns[:2 * num_exchanges]

        def num_placeholders(messages: Sequence[Message]) -> int:
            return sum(m["content"].count(self.tokenizer.image_token) for m in messages)

        num_exchanges = len(turns) // 2
        everything = num_placeholders(conversation)
        # Fewest exchanges that hold every image (and at least one answer).
        fewest = next((k for k in range(1, num_exchanges + 1)
                       if num_placeholders(prefix(k)) == everything), None)
        if fewest is None:  # an image in a trailing unanswered turn: no prefix keeps them all
            raise too_long
        # With no trailing unanswered turn, all the exchanges are the row that did not fit.
        best, low, high = None, fewest, num_exchanges - (len(turns) % 2 == 0)
        while low <= high:  # the largest k in [fewest, num_exchanges] whose prefix fits
            middle = (low + high) // 2
            try:
                best = self._tokenize_messages(element, prefix(middle), num_images, cut=False)
                low = middle + 1
            except SkipExample as skip:
                if skip.reason != "too_long":
                    raise
                high = middle - 1
        if best is not None:
            return best
        return self._tokenize_messages(element, prefix(fewest), num_images, cut=True)


class TokenizeCaption(TokenizeConversation):
    """Image-caption pairs in LLaVA's "plain" alignment format: `<image>\\n` per image, then the
    caption and EOS; the loss falls on the caption and EOS only. The caption is the example's
    `caption`, else its single assistant turn (LLaVA's pretraining JSON stores it there).
    `truncate=True` cuts the caption's tokens at seq_len (never an image token)."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int, seq_len: int,
                 prefix_lm: bool = False, truncate: bool = False):
        super().__init__(tokenizer, "plain", num_image_tokens, seq_len, prefix_lm, truncate)

    def map(self, element: Mapping[str, Any]) -> dict:
        caption = caption_of(element)
        num_images = _num_source_images(element)
        conversation = [{"role": "user", "content": self.tokenizer.image_token * num_images},
                        {"role": "assistant", "content": caption}]
        return self._tokenize(element, conversation)


class TokenizeText(grain.transforms.Map):
    """Text-only LM examples: BOS + caption + EOS, or a conversation rendered with `template`;
    every token is learned. Output has no images. Too long -> "too_long", or with `truncate` cut
    at seq_len (anywhere: the whole text is one target)."""

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
    """Image + caption -> {"images": u8[k, S, S, 3], "text_ids": i32[text_len], "text_lengths":
    i32 (its real tokens, EOS included)}.

    The caption is truncated to fit text_len (fine for contrastive captions: the text tower sees
    a prefix), and EOS is kept as the last real token ("sticky", as in big_vision's SigLIP), then
    padded with pad_id. The one-image rule is the pipeline's check ("image_count").

    negatives > 0: the element's first `negatives` hard-negative captions (its
    `negative_captions` list) the same way, as "negative_text_ids": i32[negatives, text_len] and
    "negative_text_lengths": i32[negatives]; an element with fewer is skipped
    ("no_negative_captions").
    """

    def __init__(self, tokenizer: Tokenizer, text_len: int, negatives: int = 0):
        if tokenizer.pad_id is None:
            raise ConfigError("TokenizeContrastive pads captions: the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.negatives = negatives

    def _padded(self, text: str) -> tuple[np.ndarray, int]:
        ids = self.tokenizer.encode(text)
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = ids[:self.text_len - len(eos)] + eos
        text_ids = np.full((self.text_len,), self.tokenizer.pad_id, np.int32)
        text_ids[:len(ids)] = ids
        return text_ids, len(ids)

    def map(self, element: Mapping[str, Any]) -> dict:
        text_ids, length = self._padded(caption_of(element))
        example = {"text_ids": text_ids, "text_lengths": np.int32(length)}
        if self.negatives:
            negatives = list(element.get("negative_captions") or [])
            if len(negatives) < self.negatives or not all(
                    isinstance(t, str) and t.strip() for t in negatives[:self.negatives]):
                raise SkipExample("no_negative_captions",
                                  f"{element.get('id')}: data.negative_captions="
                                  f"{self.negatives} but the example has {len(negatives)} "
                                  f"(non-empty strings in its negative_captions field)")
            padded = [self._padded(t) for t in negatives[:self.negatives]]
            example["negative_text_ids"] = np.stack([ids for ids, _ in padded])
            example["negative_text_lengths"] = np.array([n for _, n in padded], np.int32)
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
    """The chain for a pipeline `DataConfig` (task, template, seq_len, image_size, pad_to_square,
    num_image_tokens, text_len, too_long)."""
    tiling = getattr(cfg, "tiling", None)  # (tests pass plain namespaces without one)
    if tiling is not None and tiling.enabled:
        _check_tiling(tiling, cfg.task, tokenizer)
    decode = DecodeImages(cfg.image_size, cfg.pad_to_square, tiling)
    truncate = cfg.too_long == "truncate"
    if cfg.task == "instruct":
        return Chain(decode, TokenizeConversation(tokenizer, cfg.template, cfg.num_image_tokens,
                                                  cfg.seq_len, prefix_lm=prefix_lm,
                                                  truncate=truncate))
    if cfg.task == "align":
        return Chain(decode, TokenizeCaption(tokenizer, cfg.num_image_tokens, cfg.seq_len,
                                             prefix_lm=prefix_lm, truncate=truncate))
    if cfg.task == "lm":
        return Chain(TokenizeText(tokenizer, cfg.seq_len, cfg.template, truncate=truncate))
    if cfg.task == "contrastive":
        return Chain(decode, TokenizeContrastive(tokenizer, cfg.text_len,
                                                 getattr(cfg, "negative_captions", 0)))
    raise ConfigError(f"task={cfg.task!r}; supported: instruct, align, lm, contrastive")


def _check_tiling(tiling: TilingConfig, task: str, tokenizer: Tokenizer) -> None:
    """What tiled images need: a task whose text holds the image, and a tokenizer that can
    write Idefics3's layout."""
    if task not in ("instruct", "align"):
        raise ConfigError(f"data.tiling.max_tiles={tiling.max_tiles} with data.task={task!r}: "
                          f"tiling is for the tasks whose text holds the image (instruct, align)")
    missing = [t for t in tiling.layout_tokens() if tokenizer.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"data.tiling.max_tiles={tiling.max_tiles}: the tokenizer has no "
                          f"{missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} "
                          f"layout tokens missing); add them as special tokens")
    if tuple(tokenizer.image_wrap) not in (("", ""), IDEFICS3_IMAGE_WRAP):
        raise ConfigError(f"data.tiling.max_tiles={tiling.max_tiles}: tiles are written in "
                          f"Idefics3's layout, but the tokenizer writes images as "
                          f"{tokenizer.image_wrap} (its image_wrap): another model's layout")


# ---------------------------------------------------------------------- the tokenizing core

def tokenize_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece], num_images: int,
                    num_image_tokens: int, seq_len: int, prefix_lm: bool = False,
                    truncate: bool = False, example_id: str = "",
                    image_layouts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Template pieces -> the TOKENIZED EXAMPLE arrays (without images).

    Each `<image>` becomes `num_image_tokens` image ids (inside `tokenizer.image_wrap`), or with
    `image_layouts` (tiling) the text of its layout, substituted before the one encode call, as
    transformers' processors do, so the ids are exactly theirs.
    Longer than seq_len: "too_long", or with `truncate` the first seq_len tokens when that cut
    falls inside the last answer (the last run of target tokens): after every image token, with
    at least one of that answer's tokens learned. The cut example gets `truncated` = 1.
    """
    if image_layouts is not None:
        return _tokenize_with_layouts(tokenizer, pieces, num_images, image_layouts, seq_len,
                                      prefix_lm, truncate, example_id)
    ids, (is_target,) = _encode_flagged(tokenizer, pieces, 1)

    if num_images or num_image_tokens:
        at_image = ids == tokenizer.image_token_id
        if int(at_image.sum()) != num_images:
            raise SkipExample("placeholder_mismatch", f"{example_id}: {int(at_image.sum())} "
                              f"{tokenizer.image_token} placeholders for {num_images} images")
        ids, source, _ = tokenizer.expand_images(ids, num_image_tokens)
        # An image's whole block (its tokenizer.image_wrap too) is never learned nor cut.
        is_target, in_image_block = is_target[source] & ~at_image[source], at_image[source]
    else:
        in_image_block = np.zeros(len(ids), bool)

    return _finish_example(ids, is_target, in_image_block, seq_len, prefix_lm, truncate, example_id)


def _tokenize_with_layouts(tokenizer: Tokenizer, pieces: Sequence[Piece], num_images: int,
                           layouts: Sequence[str], seq_len: int, prefix_lm: bool, truncate: bool,
                           example_id: str) -> dict[str, np.ndarray]:
    """tokenize_pieces with each `<image>` replaced by its layout text (never a target)."""
    placeholder = tokenizer.image_token
    found = sum(segment.count(placeholder) for segment, _ in pieces)
    if found != num_images or len(layouts) != num_images:
        raise SkipExample("placeholder_mismatch", f"{example_id}: {found} {placeholder} "
                          f"placeholders for {num_images} images")
    parts: list[tuple[str, bool, bool]] = []  # (text, is_target, in_layout)
    layout_iter = iter(layouts)
    for segment, target in pieces:
        chunks = segment.split(placeholder)
        for i, chunk in enumerate(chunks):
            if i:
                parts.append((next(layout_iter), False, True))
            parts.append((chunk, target, False))
    ids, (is_target, in_layout) = _encode_flagged(tokenizer, parts, 2)
    return _finish_example(ids, is_target & ~in_layout, in_layout, seq_len, prefix_lm, truncate,
                           example_id)


def _encode_flagged(tokenizer: Tokenizer, parts: Sequence[tuple], num_flags: int
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """parts (text, flag_1 .. flag_n) -> (ids i32[T] of their concatenation, encoded in one call;
    per flag a bool[T]: a token's flag is that of the part its first character lies in)."""
    text = "".join(part[0] for part in parts)
    char_flags = np.zeros((num_flags, len(text) + 1), bool)
    start = 0
    for part, *flags in parts:
        char_flags[:, start:start + len(part)] = np.asarray(flags, bool)[:, None]
        start += len(part)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.asarray([s for s, _ in offsets], np.int64).reshape(-1)
    return np.asarray(ids, np.int32), list(char_flags[:, starts])


def _finish_example(ids: np.ndarray, is_target: np.ndarray, in_image_block: np.ndarray,
                    seq_len: int, prefix_lm: bool, truncate: bool, example_id: str
                    ) -> dict[str, np.ndarray]:
    if not is_target[1:].any():
        raise SkipExample("no_answer", f"{example_id}: no answer token to learn")
    cut = len(ids) > seq_len
    if cut:
        last_image = int(np.flatnonzero(in_image_block)[-1]) if in_image_block.any() else -1
        last_answer = max(_last_run_start(is_target), 1)  # token 0 is never learned
        if not (truncate and last_image < seq_len and is_target[last_answer:seq_len].any()):
            raise SkipExample("too_long", f"{example_id}: {len(ids)} tokens > seq_len {seq_len}")
        ids, is_target = ids[:seq_len], is_target[:seq_len]

    n = len(ids)
    mask_ar = np.ones(n, np.int32)
    if prefix_lm:
        mask_ar[:int(np.argmax(is_target))] = 0
    example = {
        "input_ids": ids,
        "target_ids": np.append(ids[1:], 0).astype(np.int32),
        "loss_mask": np.append(is_target[1:], False).astype(np.float32),
        "positions": np.arange(n, dtype=np.int32),
        "mask_ar": mask_ar,
    }
    if cut:
        example["truncated"] = np.int32(1)
    return example


def _last_run_start(flags: np.ndarray) -> int:
    """Index where the last run of True values of `flags` starts (a template's last answer)."""
    true_positions = np.flatnonzero(flags)
    if not len(true_positions):
        return len(flags)
    gaps = np.flatnonzero(np.diff(true_positions) > 1)
    return int(true_positions[gaps[-1] + 1]) if len(gaps) else int(true_positions[0])


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


def _num_source_images(element: Mapping[str, Any]) -> int:
    """Images of the example before tiling (the `<image>` placeholders it must hold)."""
    if "image_grids" in element:
        return len(element["image_grids"])
    return len(element.get("images", []))


def _image_layouts(element: Mapping[str, Any], tokenizer: Tokenizer,
                   tokens_per_tile: int) -> list[str] | None:
    """The layout text of each tiled image (data/tiling.py); None when the images are not tiled."""
    if "image_grids" not in element:
        return None
    return [layout_text(int(rows), int(cols), tokenizer.image_token, tokens_per_tile)
            for rows, cols in element["image_grids"]]


def _decoded_images(element: Mapping[str, Any]) -> np.ndarray | list:
    """The u8[k, S, S, 3] images DecodeImages made; [] for text-only examples."""
    images = element.get("images", [])
    if isinstance(images, np.ndarray) or len(images) == 0:
        return images
    raise ValueError(f"{element.get('id')}: images are not decoded; run DecodeImages before "
                     "tokenizing (e.g. Chain(DecodeImages(size), TokenizeConversation(...)))")
