"""LLaVA-format conversations (a JSON list or JSONL) as a random-access source of raw examples.

A row looks like
    {"id": "000123", "image": "coco/train2017/000123.jpg",          # or a list, or absent
     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}],
     "negative_captions": ["A dog.", "Two cats."]}    # optional: hard negatives for matching
Rows are stored as compact JSON bytes (a JSON list is parsed once at construction, a JSONL file
is only indexed by line offsets), so the source stays small to pickle into grain workers and a
malformed row costs that row only. Every per-row problem raises SkipExample:

    json_malformed        a JSONL line that does not parse; a row that is not a dict, lacks a
                          `conversations` list, or has a turn with an unknown `from` / non-str
                          value, or a `negative_captions` that is not a list of strings
    text_not_utf8         the row's text is not valid UTF-8
    image_missing         an image file does not exist (or is not a file)
    path_outside_root     an image path that, after resolving `..` and symlinks, leaves image_root
    no_answer             a user turn not followed by a non-empty assistant reply
    placeholder_mismatch  number of "<image>" placeholders != number of images, or a placeholder
                          in an assistant turn

One repair is made, because LLaVA-style data often omits the placeholder for single-image rows:
a row with exactly one image and no placeholder gets "<image>\\n" prepended to its first user turn.
"""
from __future__ import annotations

import json
import os

import numpy as np

from vlm_jax.data.errors import SkipExample
from vlm_jax.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class LlavaJsonSource:
    """Random access over a LLaVA JSON / JSONL file: `len(source)`, `source[i] -> raw example`.

    image_root: directory the rows' image paths are relative to (default: the file's directory).
    """

    def __init__(self, path: str, image_root: str | None = None):
        self.path = os.path.abspath(path)
        root = image_root if image_root is not None else os.path.dirname(self.path)
        self.image_root = os.path.realpath(root)
        self.name = os.path.basename(self.path)
        with open(self.path, "rb") as handle:
            data = handle.read()
        if data.lstrip()[:1] == b"[":
            self._blob, self._offsets = _pack_json_list(data, self.path)
            self._format = "json"
        else:
            self._blob, self._offsets = b"", _line_offsets(data)
            self._format = "jsonl"

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} outside [0, {len(self)})")
        example_id = f"llava:{self.name}:{index}"
        row = self._read_row(index, example_id)
        return _row_to_example(row, example_id, self.image_root)

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, rows={len(self)}, image_root={self.image_root!r})"

    def _read_row(self, index: int, example_id: str):
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        if self._format == "json":
            return json.loads(self._blob[start:end])
        with open(self.path, "rb") as handle:
            handle.seek(start)
            line = handle.read(end - start)
        try:
            text = line.decode("utf-8", errors="strict")
        except UnicodeDecodeError as error:
            raise SkipExample("text_not_utf8", f"{example_id}: {error}") from error
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SkipExample("json_malformed", f"{example_id}: {error}") from error


def _pack_json_list(data: bytes, path: str) -> tuple[bytes, np.ndarray]:
    """Parse a JSON list once; keep each row as ASCII JSON bytes (blob + offsets i64[n+1])."""
    # surrogateescape keeps invalid UTF-8 as lone surrogates: the file still parses and
    # the bad bytes are attributed to their own row (text_not_utf8) instead of failing the file.
    try:
        rows = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON (a JSON list of rows): {error}") from error
    if not isinstance(rows, list):
        raise DataError(f"{path}: a LLaVA JSON file must hold a list of rows, got {type(rows)}")
    encoded = [json.dumps(row, ensure_ascii=True).encode("ascii") for row in rows]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(chunk) for chunk in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


def _line_offsets(data: bytes) -> np.ndarray:
    """Offsets i64[n+1]: row i is data[off[i] : off[i+1]], starting at its i-th non-blank line
    (blank lines trailing a row are whitespace to json.loads)."""
    starts, position = [], 0
    for line in data.splitlines(keepends=True):
        if line.strip():
            starts.append(position)
        position += len(line)
    return np.array(starts + [position], np.int64)


def _row_to_example(row, example_id: str, image_root: str) -> dict:
    if not isinstance(row, dict):
        raise SkipExample("json_malformed", f"{example_id}: row is a {type(row).__name__}, not a dict")
    _check_utf8(row, example_id)
    relative_paths = _image_paths(row.get("image"), example_id)
    conversation = parse_llava_conversation(row.get("conversations"), len(relative_paths),
                                            example_id)
    images = [_read_image(path, image_root, example_id) for path in relative_paths]
    example = {"id": example_id, "images": images, "conversation": conversation, "caption": None,
               "meta": {"source": "llava_json", "row_id": row.get("id"),
                        "image_paths": relative_paths}}
    if "negative_captions" in row:  # captions that do not match the image (data.negative_captions)
        negatives = row["negative_captions"]
        if not isinstance(negatives, list) or not all(isinstance(t, str) for t in negatives):
            raise SkipExample("json_malformed", f"{example_id}: negative_captions must be a list "
                                                f"of strings")
        example["negative_captions"] = negatives
    return example


def parse_llava_conversation(turns: list, num_images: int, example_id: str) -> list[dict]:
    """LLaVA `conversations` ({from, value} turns) -> [{role, content}], checked and repaired as
    the module docstring says (json_malformed, no_answer, placeholder_mismatch)."""
    if not isinstance(turns, list) or not turns:
        raise SkipExample("json_malformed", f"{example_id}: no `conversations` list")
    conversation = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES:
            raise SkipExample("json_malformed",
                              f"{example_id}: turn {turn!r:.80} needs `from` in {sorted(_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise SkipExample("json_malformed", f"{example_id}: turn value is not a string")
        conversation.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    _check_answers(conversation, example_id)
    return _check_placeholders(conversation, num_images, example_id)


def _check_utf8(value, example_id: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8", errors="strict")
        except UnicodeEncodeError as error:
            raise SkipExample("text_not_utf8", f"{example_id}: {error}") from error
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key, example_id)
            _check_utf8(item, example_id)
    elif isinstance(value, list):
        for item in value:
            _check_utf8(item, example_id)


def _check_answers(conversation: list[dict], example_id: str) -> None:
    """Every user turn must be answered by a non-empty assistant turn right after it."""
    for position, turn in enumerate(conversation):
        if turn["role"] == "user":
            reply = conversation[position + 1] if position + 1 < len(conversation) else None
            if reply is None or reply["role"] != "assistant":
                raise SkipExample("no_answer", f"{example_id}: user turn {position} is unanswered")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise SkipExample("no_answer", f"{example_id}: assistant turn {position} is empty")
    if not any(turn["role"] == "assistant" for turn in conversation):
        raise SkipExample("no_answer", f"{example_id}: no assistant turn")


def _image_paths(field, example_id: str) -> list[str]:
    if field is None:
        return []
    if isinstance(field, str):
        return [field]
    if isinstance(field, list) and all(isinstance(path, str) for path in field):
        return list(field)
    raise SkipExample("json_malformed", f"{example_id}: `image` must be a string or a list of strings")


def _check_placeholders(conversation: list[dict], num_images: int, example_id: str) -> list[dict]:
    if any(IMAGE_PLACEHOLDER in turn["content"] for turn in conversation
           if turn["role"] == "assistant"):
        raise SkipExample("placeholder_mismatch", f"{example_id}: {IMAGE_PLACEHOLDER} in an answer")
    count = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in conversation)
    if count == num_images:
        return conversation
    if num_images == 1 and count == 0:
        repaired = [dict(turn) for turn in conversation]
        first_user = next(turn for turn in repaired if turn["role"] == "user")
        first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
        return repaired
    raise SkipExample("placeholder_mismatch",
                      f"{example_id}: {count} {IMAGE_PLACEHOLDER} placeholders for {num_images} images")


def _read_image(relative_path: str, image_root: str, example_id: str) -> bytes:
    # realpath resolves `..` and symlinks; an absolute path is joined as itself.
    resolved = os.path.realpath(os.path.join(image_root, relative_path))
    if os.path.commonpath([resolved, image_root]) != image_root:
        raise SkipExample("path_outside_root",
                          f"{example_id}: {relative_path!r} resolves outside {image_root}")
    try:
        with open(resolved, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise SkipExample("image_missing", f"{example_id}: {relative_path!r}: {error}") from error
