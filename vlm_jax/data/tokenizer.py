"""The one tokenizer interface of the codebase, over HF `tokenizers` (tokenizer.json) or SentencePiece.

`Tokenizer.from_path` accepts a `tokenizer.json`, a SentencePiece `.model`, or a directory
holding one (tokenizer.json wins when both are there, as in transformers). BOS/EOS/PAD/UNK come
from a `tokenizer_config.json` / `special_tokens_map.json` next to the file when there is one,
else from the model itself. `encode` never adds BOS/EOS: chat templates write them as text, and
special-token strings inside the text (`<image>`, `<|im_end|>`, `</s>`, ...) encode as one id.

The directory's HF chat template (Jinja) is kept as `chat_template` and written back by `save`,
which writes files transformers reads as this same tokenizer: one that adds no special tokens by
itself either, so `AutoTokenizer(saved)(prompt)` gives exactly `encode(prompt)`, one BOS included.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken

from vlm_jax.errors import DataError

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves and first looks for it
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
RESERVED_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", IMAGE_TOKEN)

# Names used by common model families, for a bare tokenizer.json that comes without a config.
_KNOWN_NAMES = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
}

Offsets = list[tuple[int, int]]


class _HFBackend:
    """A `tokenizers.Tokenizer` (tokenizer.json): added tokens are matched in text natively."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def vocab_size(self) -> int:
        # max id + 1, not the token count: vocabularies may have holes.
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        self.tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in tokens])

    def added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}

    def save(self, directory: str) -> None:
        # Llama 3's and Gemma's tokenizer.json prepend BOS in their post_processor, which
        # transformers applies on every call (add_bos_token in the config does not override a
        # tokenizer.json): our prompts already start with BOS as text, so it would come twice.
        data = json.loads(self.tokenizer.to_str())
        data["post_processor"] = _without_special_tokens(data.get("post_processor"))
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)


class _SentencePieceBackend:
    """A SentencePiece model plus tokens added after training (ids from the model's size upwards).

    SentencePiece never matches control symbols (`<s>`, `</s>`, ...) in text, and cannot grow its
    vocabulary; so the text is first split on the special-token strings (as HF's Llama tokenizer
    does) and each plain chunk goes to SentencePiece on its own.
    """

    def __init__(self, model_proto: bytes, added: dict[int, str] | None = None):
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.added: dict[int, str] = {}
        self._special: dict[str, int] = {}
        for i in range(self.processor.get_piece_size()):
            if self.processor.is_control(i) or self.processor.is_unknown(i):
                self._special[self.processor.id_to_piece(i)] = i
        for i, token in sorted((added or {}).items()):
            # HF configs also list the model's own control pieces (<unk>, <s>, </s>) here.
            if i >= self.processor.get_piece_size():
                self._add(token, i)
        self._update_pattern()

    def _add(self, token: str, token_id: int) -> None:
        self.added[token_id] = token
        self._special[token] = token_id

    def _update_pattern(self) -> None:
        names = sorted(self._special, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for chunk in self._pattern.split(text):
            if not chunk:
                continue
            if chunk in self._special:
                ids.append(self._special[chunk])
                offsets.append((start, start + len(chunk)))
            else:
                # SentencePiece reports byte offsets into the chunk; we want character offsets.
                char_of_byte = [c for c, ch in enumerate(chunk) for _ in ch.encode("utf-8")]
                char_of_byte.append(len(chunk))
                proto = self.processor.encode(chunk, return_type="proto")
                for piece in proto.pieces:
                    ids.append(piece.id)
                    offsets.append((start + char_of_byte[piece.begin],
                                    start + char_of_byte[piece.end]))
            start += len(chunk)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        special_ids = set(self._special.values())
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in special_ids:
                parts.append(self.processor.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(self.added.get(i) or self.processor.id_to_piece(i))
            else:
                run.append(i)
        parts.append(self.processor.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        token_id = self.processor.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces.
        if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id):
            return None
        return token_id

    def vocab_size(self) -> int:
        return max([self.processor.get_piece_size() - 1, *self.added]) + 1

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        for token in tokens:
            if self.token_to_id(token) is None:
                self._add(token, self.vocab_size())
        self._update_pattern()

    def added_tokens(self) -> dict[int, str]:
        return dict(self.added)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self.model_proto)


class Tokenizer:
    """Text <-> token ids, with the special tokens the data pipeline and the models need.

    bos_id / eos_id / pad_id / unk_id are None where the tokenizer has no such token (Qwen2 has
    no BOS, Llama has no PAD). `image_token_id` raises until `<image>` is in the vocabulary: add
    it with `add_special_tokens([tokenizer.image_token])` and resize the model's embeddings.
    `chat_template`: the HF Jinja chat template the files came with, or None; assign another
    (e.g. `templates.get_template(name).jinja`) before `save` to ship the one a model learned.
    `image_wrap`: (before, after), the special-token text written around each image's run of
    image tokens (`expand_images`); ("", "") writes the bare run (LLaVA, PaliGemma). An Idefics3
    import sets IDEFICS3_IMAGE_WRAP, the single-tile layout its processor writes; `save` records
    it, so training, generate and the export all write images the same way.
    """

    image_token = IMAGE_TOKEN

    def __init__(self, backend: _HFBackend | _SentencePieceBackend,
                 special_tokens: dict[str, str | None], chat_template: str | None = None,
                 image_wrap: Sequence[str] = ("", "")):
        unknown = set(special_tokens) - set(SPECIAL_ROLES)
        if unknown:
            raise DataError(f"unknown special token roles {sorted(unknown)}; "
                            f"supported: {SPECIAL_ROLES}")
        self._backend = backend
        self.bos_token = special_tokens.get("bos")
        self.eos_token = special_tokens.get("eos")
        self.pad_token = special_tokens.get("pad")
        self.unk_token = special_tokens.get("unk")
        self.chat_template = chat_template
        self.image_wrap = tuple(image_wrap)
        for role in SPECIAL_ROLES:
            token = getattr(self, f"{role}_token")
            if token is not None and backend.token_to_id(token) is None:
                raise DataError(f"{role}_token {token!r} is not in the vocabulary")

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_path(cls, path: str) -> "Tokenizer":
        """Load a tokenizer.json, a SentencePiece .model, or a directory holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in ("tokenizer.json", "tokenizer.model"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise DataError(f"{path} holds neither tokenizer.json nor tokenizer.model")
        directory = os.path.dirname(path)
        config = _read_config(directory)
        if path.endswith(".json"):
            backend = _HFBackend(tokenizers.Tokenizer.from_file(path))
        elif path.endswith(".model"):
            with open(path, "rb") as f:
                proto = f.read()
            added = {int(i): entry["content"]
                     for i, entry in config.get("added_tokens_decoder", {}).items()}
            backend = _SentencePieceBackend(proto, added)
        else:
            raise DataError(f"unsupported tokenizer file {path}: expected tokenizer.json "
                            "(HF tokenizers) or a SentencePiece .model")
        return cls(backend, _special_tokens(config, backend), _chat_template(directory, config),
                   config.get(IMAGE_WRAP_KEY, ("", "")))

    def save(self, directory: str) -> None:
        """Write the model file, a tokenizer_config.json that transformers understands (no
        automatic BOS/EOS) and the chat template as chat_template.jinja."""
        os.makedirs(directory, exist_ok=True)
        self._backend.save(directory)
        template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if self.chat_template is not None:
            with open(template_path, "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        elif os.path.exists(template_path):
            os.remove(template_path)  # transformers would load an earlier save's template as ours
        # add_bos_token is what a tokenizer.model directory reads (a tokenizer.json one ignores it).
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                         "rstrip": False, "single_word": False}
                for i, t in sorted(self._backend.added_tokens().items())},
        }
        if isinstance(self._backend, _HFBackend):
            # A SentencePiece model gets no class: transformers' Llama converter would assume
            # Llama's normaliser and could give other ids than this model does.
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for role in SPECIAL_ROLES:
            config[f"{role}_token"] = getattr(self, f"{role}_token")
        if any(self.image_wrap):
            config[IMAGE_WRAP_KEY] = list(self.image_wrap)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        special_map = {f"{r}_token": getattr(self, f"{r}_token") for r in SPECIAL_ROLES
                       if getattr(self, f"{r}_token") is not None}
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump(special_map, f, indent=2)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added."""
        return self._backend.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Token ids and each token's (start, end) character span in `text`."""
        return self._backend.encode_with_offsets(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add tokens that are never split and encode as one id; returns their ids (existing
        tokens keep theirs). The vocabulary grows: the caller resizes the embeddings."""
        new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
        if new:
            self._backend.add_special_tokens(new)
        return [self.token_to_id(t) for t in tokens]

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows the ids need (largest id + 1), added tokens included."""
        return self._backend.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self.token_to_id(self.unk_token)

    @property
    def image_wrap(self) -> tuple[str, str]:
        return self._image_wrap

    @image_wrap.setter
    def image_wrap(self, wrap: Sequence[str]) -> None:
        """Each side must be special tokens only, so that its ids are the same wherever it is
        written (a plain word would merge with the text around it)."""
        wrap = tuple(wrap)
        if len(wrap) != 2 or not all(isinstance(side, str) for side in wrap):
            raise DataError(f"image_wrap must be (before, after) strings, got {wrap!r}")
        added = set(self._backend.added_tokens().values())
        wrap_ids = tuple(np.asarray(self.encode(side), np.int32) for side in wrap)
        for side, ids in zip(wrap, wrap_ids):
            if side and not all(self._backend.decode([int(i)], False) in added for i in ids):
                raise DataError(f"image_wrap {side!r} is not made of the tokenizer's special "
                                f"tokens (it encodes as {ids.tolist()}): add them first")
        # encoded once here: `expand_images` runs for every example the pipeline tokenizes
        self._image_wrap, self._image_wrap_ids = wrap, wrap_ids

    def expand_images(self, ids: np.ndarray, num_image_tokens: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each `<image>` id in `ids` -> image_wrap[0] + `num_image_tokens` image ids +
        image_wrap[1], as the model reads an image. -> (new ids i32[T'], source i64[T']: the
        index in `ids` each new id comes from, is_image bool[T']: the image ids themselves)."""
        ids = np.asarray(ids, np.int32)
        image_id = self.image_token_id
        before, after = self._image_wrap_ids
        block = np.concatenate([before, np.full(num_image_tokens, image_id, np.int32), after])
        block_image = np.zeros(len(block), bool)
        block_image[len(before):len(before) + num_image_tokens] = True
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, source, is_image)
        start = 0
        for at in np.flatnonzero(ids == image_id):
            parts.append((ids[start:at], np.arange(start, at), np.zeros(at - start, bool)))
            parts.append((block, np.full(len(block), at), block_image))
            start = at + 1
        parts.append((ids[start:], np.arange(start, len(ids)), np.zeros(len(ids) - start, bool)))
        new_ids, source, is_image = (np.concatenate(column) for column in zip(*parts))
        return new_ids.astype(np.int32), source.astype(np.int64), is_image

    @property
    def image_token_id(self) -> int:
        token_id = self.token_to_id(self.image_token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; call "
                             f"add_special_tokens([{self.image_token!r}]) and resize embeddings")
        return token_id


IMAGE_WRAP_KEY = "vlm_jax_image_wrap"  # tokenizer_config.json: [before, after]
# Idefics3 / SmolVLM's processor, one image not split into tiles (processing_idefics3.py).
IDEFICS3_IMAGE_WRAP = ("<fake_token_around_image><global-img>", "<fake_token_around_image>")


def train_word_tokenizer(texts: Iterable[str], special_tokens: Sequence[str] = (),
                         vocab_size: int = 4096) -> Tokenizer:
    """A small tokenizer trained on `texts` for a closed-vocabulary world (the shapes default).

    Byte-level BPE: on a small regular corpus the merges reach whole words, so each word is one
    token in practice, while any text (numbers, punctuation, unseen words) still round-trips
    exactly, which a pure word-level model would not (it re-spaces punctuation, maps to <unk>).
    Reserved ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, <image>=4, then `special_tokens`.
    """
    reserved = list(dict.fromkeys([*RESERVED_TOKENS, *special_tokens]))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=reserved, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return Tokenizer(_HFBackend(tokenizer),
                     {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"})


# ---------------------------------------------------------------------- files

# Post-processors that add special tokens (BOS, CLS/SEP, ...); they are all replaced by one that
# adds none. Others (ByteLevel: offsets only) are kept.
_SPECIAL_TOKEN_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")
_NO_SPECIAL_TOKENS = {  # TemplateProcessing(single="$A:0", pair="$A:0 $B:1") as JSON
    "type": "TemplateProcessing", "special_tokens": {},
    "single": [{"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}


def _without_special_tokens(processor: dict | None) -> dict | None:
    """A tokenizer.json post_processor with every special-token-adding step made a no-op."""
    if processor is None:
        return None
    if processor["type"] == "Sequence":
        return dict(processor, processors=[_without_special_tokens(p)
                                           for p in processor["processors"]])
    if processor["type"] in _SPECIAL_TOKEN_PROCESSORS:
        return dict(_NO_SPECIAL_TOKENS)
    return processor


def _chat_template(directory: str, config: dict) -> str | None:
    """The chat template as transformers 5 finds it: chat_template.jinja, else tokenizer_config's
    "chat_template" (a string, or a list of {name, template} whose "default" one we keep)."""
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if not isinstance(template, list):
        raise DataError(f"{directory}: tokenizer_config.json chat_template is a "
                        f"{type(template).__name__}; expected a string or a list of "
                        "{name, template}")
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        raise DataError(f"{directory}: tokenizer_config.json names chat templates {sorted(named)}"
                        " but none 'default', the one a chat uses")
    return named["default"]


# ---------------------------------------------------------------------- special-token lookup

def _read_config(directory: str) -> dict:
    """tokenizer_config.json, with special_tokens_map.json filling in roles it does not name."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                config.update(json.load(f))
    return config


def _special_tokens(config: dict, backend: _HFBackend | _SentencePieceBackend
                    ) -> dict[str, str | None]:
    """Role -> token string: the config's choice (an explicit null means "none"), else the
    SentencePiece model's own ids, else a known name present in the vocabulary."""
    special: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        if key in config:
            value = config[key]
            special[role] = value["content"] if isinstance(value, dict) else value
            continue
        if isinstance(backend, _SentencePieceBackend):
            token_id = getattr(backend.processor, f"{role}_id")()
            special[role] = backend.processor.id_to_piece(token_id) if token_id >= 0 else None
            continue
        special[role] = next(
            (name for name in _KNOWN_NAMES[role] if backend.token_to_id(name) is not None), None)
    return special
