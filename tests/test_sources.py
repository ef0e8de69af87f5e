"""Tests for the file-backed sources: LLaVA JSON/JSONL, WebDataset tar shards, TFDS ArrayRecord."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import decode_image


def _png(color, size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _reason(source, index) -> str:
    with pytest.raises(SkipExample) as caught:
        source[index]
    return caught.value.reason


# ---------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL

def _turns(*pairs):
    return [{"from": speaker, "value": text} for speaker, text in pairs]


@pytest.fixture
def llava_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(_png((255, 0, 0)))
    (images / "blue.png").write_bytes(_png((0, 0, 255)))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png((0, 255, 0)))
    os.symlink(outside, images / "link_out.png")
    return tmp_path


# (row, expected reason or None for a good row)
LLAVA_ROWS = [
    ({"id": "a", "image": "red.png",
      "conversations": _turns(("human", "<image>\nWhat color?"), ("gpt", "Red."))}, None),
    ({"id": "multi", "image": ["red.png", "blue.png"],
      "conversations": _turns(("system", "Be brief."), ("human", "<image> vs <image>?"),
                              ("gpt", "red, blue"), ("human", "Sure?"), ("gpt", "Yes."))}, None),
    ({"id": "text", "conversations": _turns(("human", "Hi"), ("gpt", "Hello"))}, None),
    ({"id": "repair", "image": "blue.png",
      "conversations": _turns(("human", "Color?"), ("gpt", "Blue."))}, None),
    ({"id": "missing", "image": "nope.png",
      "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "image_missing"),
    ({"id": "dotdot", "image": "../secret.png",
      "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "path_outside_root"),
    ({"id": "symlink", "image": "link_out.png",
      "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "path_outside_root"),
    ({"id": "absolute", "image": "/etc/hostname",
      "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "path_outside_root"),
    ({"id": "unanswered", "conversations": _turns(("human", "Q1"), ("gpt", "A1"), ("human", "Q2"))},
     "no_answer"),
    ({"id": "empty_answer", "conversations": _turns(("human", "Q"), ("gpt", "  "))}, "no_answer"),
    ({"id": "too_many", "image": "red.png",
      "conversations": _turns(("human", "<image><image>"), ("gpt", "x"))}, "placeholder_mismatch"),
    ({"id": "two_no_placeholder", "image": ["red.png", "blue.png"],
      "conversations": _turns(("human", "compare"), ("gpt", "x"))}, "placeholder_mismatch"),
    ({"id": "text_with_placeholder", "conversations": _turns(("human", "<image>"), ("gpt", "x"))},
     "placeholder_mismatch"),
    ({"id": "no_conversations", "image": "red.png"}, "json_malformed"),
    (["not", "a", "dict"], "json_malformed"),
    ({"id": "bad_role", "conversations": _turns(("robot", "Q"), ("gpt", "A"))}, "json_malformed"),
]


def _check_llava_rows(source):
    assert len(source) == len(LLAVA_ROWS)
    for index, (row, expected) in enumerate(LLAVA_ROWS):
        if expected is not None:
            assert _reason(source, index) == expected, row
    first = source[0]
    assert first["id"].endswith(":0") and first["meta"]["row_id"] == "a"
    assert first["conversation"] == [{"role": "user", "content": "<image>\nWhat color?"},
                                     {"role": "assistant", "content": "Red."}]
    assert decode_image(first["images"][0])[0, 0].tolist() == [255, 0, 0]
    multi = source[1]
    assert [turn["role"] for turn in multi["conversation"]] == [
        "system", "user", "assistant", "user", "assistant"]
    assert [decode_image(image)[0, 0].tolist() for image in multi["images"]] == [
        [255, 0, 0], [0, 0, 255]]
    text_only = source[2]
    assert text_only["images"] == [] and text_only["caption"] is None
    repaired = source[3]
    assert repaired["conversation"][0]["content"] == "<image>\nColor?"
    assert len(repaired["images"]) == 1


def test_llava_json_list_good_and_bad_rows(llava_dir):
    path = llava_dir / "train.json"
    path.write_text(json.dumps([row for row, _ in LLAVA_ROWS]))
    from vlm_jax.data.sources.llava_json import LlavaJsonSource
    source = LlavaJsonSource(str(path), image_root=str(llava_dir / "images"))
    _check_llava_rows(source)
    _check_llava_rows(pickle.loads(pickle.dumps(source)))


def test_llava_jsonl_with_malformed_and_non_utf8_lines(llava_dir):
    lines = [json.dumps(row).encode() for row, _ in LLAVA_ROWS]
    bad_json = b'{"id": "broken", "conversations": [ {"from": '
    bad_utf8 = json.dumps({"id": "latin1", "conversations": _turns(
        ("human", "caf\u00e9?"), ("gpt", "oui"))}).replace("\\u00e9", "\xe9").encode("latin-1")
    path = llava_dir / "train.jsonl"
    path.write_bytes(b"\n".join(lines + [b"", bad_json, bad_utf8, b"   "]) + b"\n")
    from vlm_jax.data.sources.llava_json import LlavaJsonSource
    source = LlavaJsonSource(str(path), image_root=str(llava_dir / "images"))
    assert len(source) == len(LLAVA_ROWS) + 2  # blank lines are not rows
    assert _reason(source, len(LLAVA_ROWS)) == "json_malformed"
    assert _reason(source, len(LLAVA_ROWS) + 1) == "text_not_utf8"
    _check_llava_rows(_FirstRows(source, len(LLAVA_ROWS)))


def test_llava_json_list_attributes_bad_utf8_to_its_row(llava_dir):
    good = json.dumps({"conversations": _turns(("human", "Q"), ("gpt", "A"))}).encode()
    bad = good.replace(b'"A"', b'"\xff\xfe"')
    path = llava_dir / "rows.json"
    path.write_bytes(b"[" + good + b", " + bad + b"]")
    from vlm_jax.data.sources.llava_json import LlavaJsonSource
    source = LlavaJsonSource(str(path))
    assert source[0]["conversation"][1]["content"] == "A"
    assert _reason(source, 1) == "text_not_utf8"
    with pytest.raises(IndexError):
        source[2]


def test_llava_json_whole_file_invalid_raises_value_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"conversations": []}, ')
    from vlm_jax.data.sources.llava_json import LlavaJsonSource
    with pytest.raises(ValueError, match="not valid JSON"):
        LlavaJsonSource(str(path))


class _FirstRows:
    def __init__(self, source, count):
        self.source, self.count = source, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.source[index]
