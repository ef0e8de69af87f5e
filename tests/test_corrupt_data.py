"""Acceptance test for bad data: a LLaVA JSONL set where a third of the rows are broken in every
way we know of goes through the real pipeline; each good row comes out exactly once per epoch,
each bad row is counted once (not once per epoch) under the right reason, and too many bad rows
stop the run."""
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.pipeline import DataConfig, TooManySkippedExamples, build_pipeline
from vlm_jax.data.templates import VICUNA_DEFAULT_SYSTEM
from vlm_jax.data.tokenizer import train_word_tokenizer

GOOD_KINDS = ("rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb",
              "rgb", "rgb", "rgb", "rgb", "rgb", "tiny_1x1", "cmyk", "palette", "gray16", "text_only",
              "rgba", "two_images")
# kind -> the reason it must be counted under
BAD_KINDS = {"corrupt": "image_corrupt", "truncated": "image_corrupt",
             "missing": "image_missing", "missing_dir": "image_missing",
             "huge_header": "image_too_large", "malformed_json": "json_malformed",
             "no_answer": "no_answer", "empty_answer": "no_answer",
             "placeholder_mismatch": "placeholder_mismatch", "not_utf8": "text_not_utf8",
             "dotdot_passwd": "path_outside_root", "absolute_outside": "path_outside_root"}


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def image_file(kind: str, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    if kind == "tiny_1x1":
        return encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    if kind == "cmyk":
        return encode(rgb.convert("CMYK"), "JPEG")
    if kind == "palette":
        return encode(rgb.convert("P"), "PNG")
    if kind == "gray16":
        return encode(Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)), "PNG")
    if kind == "rgba":
        return encode(rgb.convert("RGBA"), "PNG")
    if kind == "corrupt":
        return rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    if kind == "truncated":
        return encode(rgb, "JPEG")[:300]
    if kind == "huge_header":
        return png_header_only(20000, 20000)
    return encode(rgb, "JPEG")


def turns(number: int, question: str = "What is shown?", answer: str | None = None) -> list:
    answer = f"It is item{number} here." if answer is None else answer
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def row_line(number: int, kind: str, root: str, rng: np.random.Generator) -> bytes:
    """One JSONL line for row `number` of the given kind (writing its image files)."""
    name = f"img{number}.png"
    row = {"id": str(number), "image": name, "conversations": turns(number, "<image>\nWhat is shown?")}
    if kind in ("rgb", "tiny_1x1", "cmyk", "palette", "gray16", "rgba", "corrupt", "truncated",
                "huge_header"):
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(image_file(kind, rng))
    elif kind == "two_images":
        row["image"] = [f"img{number}a.jpg", f"img{number}b.jpg"]
        row["conversations"] = turns(number, "<image>\n<image>\nAre they alike?")
        for path in row["image"]:
            with open(os.path.join(root, path), "wb") as handle:
                handle.write(image_file("rgb", rng))
    elif kind == "text_only":
        del row["image"]
        row["conversations"] = turns(number)
    elif kind == "missing":
        row["image"] = "nowhere.jpg"
    elif kind == "missing_dir":
        row["image"] = "no/such/dir/x.jpg"
    elif kind == "malformed_json":
        return b'{"id": "broken", "image": "x.jpg", "conversations": [{"from": "human",\n'
    elif kind == "no_answer":
        row["conversations"] = row["conversations"][:1]
        open(os.path.join(root, name), "wb").write(image_file("rgb", rng))
    elif kind == "empty_answer":
        row["conversations"] = turns(number, "<image>\nWhat?", answer="  ")
        open(os.path.join(root, name), "wb").write(image_file("rgb", rng))
    elif kind == "placeholder_mismatch":
        row["conversations"] = turns(number, "<image>\n<image>\nWhat is shown?")
        open(os.path.join(root, name), "wb").write(image_file("rgb", rng))
    elif kind == "not_utf8":
        open(os.path.join(root, name), "wb").write(image_file("rgb", rng))
        line = json.dumps(row, ensure_ascii=True).encode()
        return line.replace(b"What is shown?", b"What is \xff\xfe shown?") + b"\n"
    elif kind == "dotdot_passwd":
        row["image"] = "../../../../../../etc/passwd"
    elif kind == "absolute_outside":
        row["image"] = os.path.abspath(os.path.join(root, "..", "outside.png"))
        open(row["image"], "wb").write(image_file("rgb", rng))
    else:
        raise ValueError(kind)
    return json.dumps(row).encode() + b"\n"


@pytest.fixture(scope="module")
def dirty_set(tmp_path_factory):
    """(jsonl path, good row numbers, {reason: count}, tokenizer) with bad rows spread through."""
    base = tmp_path_factory.mktemp("dirty")
    root = base / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    kinds = list(GOOD_KINDS) + list(BAD_KINDS)
    order = rng.permutation(len(kinds))
    lines, good, reasons = [], set(), {}
    for number, kind_index in enumerate(order):
        kind = kinds[kind_index]
        lines.append(row_line(number, kind, str(root), rng))
        if kind in BAD_KINDS:
            reasons[BAD_KINDS[kind]] = reasons.get(BAD_KINDS[kind], 0) + 1
        else:
            good.add(number)
    path = base / "train.jsonl"
    path.write_bytes(b"".join(lines))
    texts = [VICUNA_DEFAULT_SYSTEM] + [f"USER: What is shown? Are they alike? ASSISTANT: It is "
                                       f"item{n} here." for n in range(len(kinds))]
    tokenizer = train_word_tokenizer(texts, vocab_size=400)
    return str(path), str(root), good, reasons, tokenizer


def dirty_config(path: str, root: str, **overrides) -> DataConfig:
    values = dict(sources=({"kind": "llava_json", "options": {"path": path, "image_root": root}},),
                  task="instruct", template="vicuna", seq_len=160, image_size=16,
                  num_image_tokens=4, batch_size=2, packing=True, max_images_per_row=4, seed=3,
                  num_epochs=2, max_skip_fraction=0.5, min_seen_for_skip_check=20)
    values.update(overrides)
    return DataConfig(**values)


def row_numbers(batch, tokenizer) -> list[int]:
    """The row number of every packed example, read back from its decoded answer."""
    numbers = []
    for input_ids, segment_ids in zip(batch["input_ids"], batch["segment_ids"]):
        for segment in np.unique(segment_ids[segment_ids > 0]):
            text = tokenizer.decode(input_ids[segment_ids == segment].tolist())
            found = re.findall(r"item(\d+)", text)
            assert len(found) == 1, text
            numbers.append(int(found[0]))
    return numbers


def test_every_good_row_once_per_epoch_and_bad_rows_counted_by_reason(dirty_set):
    path, root, good, reasons, tokenizer = dirty_set
    assert len(good) == 2 * sum(reasons.values())  # a third of the rows are bad
    iterator = build_pipeline(dirty_config(path, root), tokenizer, process_index=0, process_count=1)
    numbers, num_images = [], 0
    for batch in iterator:
        numbers += row_numbers(batch, tokenizer)
        num_images += int(batch["num_images"].sum())
        assert batch["images"].dtype == np.uint8  # resized pixels, normalised on the device
    epoch_length = len(good)
    assert len(numbers) == 2 * epoch_length
    assert sorted(numbers[:epoch_length]) == sorted(good)
    assert sorted(numbers[epoch_length:]) == sorted(good)
    assert numbers[:epoch_length] != numbers[epoch_length:]  # reshuffled
    assert num_images == 2 * (len(good) - 1 + 1)  # text-only has none, two_images has two
    # Both epochs meet every bad row; each is counted once (by its source row), seen once.
    counts = iterator.skip_counts()
    assert counts["seen"] == 2 * len(good) + sum(reasons.values())
    assert counts["skipped"] == reasons


def test_too_many_bad_rows_stop_the_run_with_the_counts(dirty_set):
    path, root, _, reasons, tokenizer = dirty_set
    iterator = build_pipeline(dirty_config(path, root, max_skip_fraction=0.2), tokenizer,
                              process_index=0, process_count=1)
    with pytest.raises(TooManySkippedExamples) as raised:
        list(iterator)
    message = str(raised.value)
    assert "max_skip_fraction=0.2" in message
    counts = iterator.skip_counts()
    assert f"skipped by reason: {counts['skipped']}" in message
    assert len(counts["skipped"]) >= 2 and set(counts["skipped"]) <= set(reasons)
    assert counts["seen"] >= 10  # not before min_seen_for_skip_check


def test_webdataset_bad_members_and_a_truncated_shard_are_counted(tmp_path, dirty_set):
    *_, tokenizer = dirty_set
    import tarfile

    rng = np.random.default_rng(1)

    def write_shard(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    def sample(number, image_kind="rgb"):
        conversation = json.dumps({"conversations": turns(number, "<image>\nWhat is shown?")})
        return [(f"{number:04d}.jpg", image_file(image_kind, rng)),
                (f"{number:04d}.json", conversation.encode())]

    write_shard(tmp_path / "a.tar", sample(0) + sample(1, "corrupt") + sample(2) + sample(3))
    write_shard(tmp_path / "b.tar", sample(4) + sample(5) + sample(6))
    whole = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[:len(whole) // 2])  # cut inside the last sample
    cfg = dirty_config("", "", num_epochs=1, sources=(
        {"kind": "webdataset", "options": {"shards": str(tmp_path / "*.tar")}},))
    iterator = build_pipeline(cfg, tokenizer, process_index=0, process_count=1)
    numbers = [n for batch in iterator for n in row_numbers(batch, tokenizer)]
    skipped = iterator.skip_counts()["skipped"]
    assert skipped == {"image_corrupt": 1, "tar_truncated": 1}
    # Sample 4 lies whole before the cut; 5 and 6 go with the shard's truncated end.
    assert sorted(numbers) == [0, 2, 3, 4]
