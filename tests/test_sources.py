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
    ({"id": "negatives", "image": "red.png", "negative_captions": ["Blue.", "Green."],
      "conversations": _turns(("human", "<image>"), ("gpt", "Red."))}, None),
    ({"id": "bad_negatives", "image": "red.png", "negative_captions": "Blue.",
      "conversations": _turns(("human", "<image>"), ("gpt", "Red."))}, "json_malformed"),
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
    assert "negative_captions" not in first
    negatives = [i for i, (row, _) in enumerate(LLAVA_ROWS) if "negative_captions" in row][0]
    assert source[negatives]["negative_captions"] == ["Blue.", "Green."]


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


# ---------------------------------------------------------------------------------------------
# WebDataset

def _write_tar(path, members, mode="w"):
    import tarfile
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _conversation_json(text="What?"):
    return json.dumps({"conversations": _turns(("human", "<image>\n" + text),
                                               ("gpt", "A shape."))}).encode()


@pytest.fixture
def wds_shards(tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    _write_tar(tmp_path / "shard-000.tar", [
        ("a/k0.jpg", red), ("a/k0.txt", b"a red image"),
        ("a/k1.png", blue), ("a/k1.json", json.dumps({"caption": "blue"}).encode()),
        ("a/k2.txt", b"caption without image"),
        ("a/k3.png", red),
        ("a/k4.png", red), ("a/k4.json", _conversation_json()),
        ("a/k5.png", red), ("a/k5.txt", b"caf\xe9"),
        ("a/k6.png", red), ("a/k6.json", b"{not json"),
        ("a/k7.webp", blue), ("a/k7.txt", b"last of shard 0")])
    _write_tar(tmp_path / "shard-001.tar", [
        item for i in range(3) for item in ((f"b{i}.png", red), (f"b{i}.txt", f"b {i}".encode()))])
    # shard 2: one good example, then a member cut off in the middle of its data.
    _write_tar(tmp_path / "full-002.tar", [("c0.png", red), ("c0.txt", b"c zero"),
                                           ("c1.png", bytes(range(256)) * 12),
                                           ("c1.txt", b"never seen")])
    full = (tmp_path / "full-002.tar").read_bytes()
    (tmp_path / "shard-002.tar").write_bytes(full[:512 * 6 + 100])
    # shard 3: cut right after a member's data padding: no end-of-archive block.
    _write_tar(tmp_path / "full-003.tar", [("d0.png", red), ("d0.txt", b"d zero")])
    full = (tmp_path / "full-003.tar").read_bytes()
    header_and_png = 512 + -(-len(red) // 512) * 512
    (tmp_path / "shard-003.tar").write_bytes(full[:header_and_png])
    return tmp_path


EXPECTED_WDS = [  # (id or SkipExample reason) in stream order
    "wds:shard-000.tar:a/k0", "wds:shard-000.tar:a/k1", "image_missing", "caption_missing",
    "wds:shard-000.tar:a/k4", "text_not_utf8", "json_malformed", "wds:shard-000.tar:a/k7",
    "wds:shard-001.tar:b0", "wds:shard-001.tar:b1", "wds:shard-001.tar:b2",
    "wds:shard-002.tar:c0", "tar_truncated",
    "tar_truncated"]


def _drain(iterator, limit=None):
    """Ids and skip reasons in order, as a pipeline would count them."""
    seen = []
    while limit is None or len(seen) < limit:
        try:
            seen.append(next(iterator)["id"])
        except SkipExample as skip:
            seen.append(skip.reason)
        except StopIteration:
            break
    return seen


def test_webdataset_stream_groups_members_and_counts_bad_ones(wds_shards):
    from vlm_jax.data.sources.webdataset import WebDatasetSource
    source = WebDatasetSource(str(wds_shards / "shard-*.tar"))
    assert _drain(iter(source)) == EXPECTED_WDS
    examples = {}
    iterator = iter(source)
    for _ in range(5):
        try:
            example = next(iterator)
            examples[example["meta"]["key"]] = example
        except SkipExample:
            pass
    assert examples["a/k0"]["caption"] == "a red image"
    assert decode_image(examples["a/k0"]["images"][0])[0, 0].tolist() == [255, 0, 0]
    assert examples["a/k1"]["caption"] == "blue" and examples["a/k1"]["conversation"] is None
    assert examples["a/k4"]["conversation"][1] == {"role": "assistant", "content": "A shape."}


def test_webdataset_resumes_exactly_from_any_point(wds_shards):
    from vlm_jax.data.sources.webdataset import WebDatasetSource
    source = WebDatasetSource(str(wds_shards / "shard-{000..003}.tar"))
    for stop in range(len(EXPECTED_WDS)):
        iterator = iter(source)
        head = _drain(iterator, limit=stop)
        state = json.loads(json.dumps(iterator.get_state()))
        resumed = iter(source)
        resumed.set_state(state)
        assert head + _drain(resumed) == EXPECTED_WDS, (stop, state)


def test_webdataset_gzip_shard_resumes_by_rereading(tmp_path):
    from vlm_jax.data.sources.webdataset import WebDatasetSource
    _write_tar(tmp_path / "z.tar.gz", [item for i in range(4) for item in (
        (f"z{i}.png", _png((i, i, i))), (f"z{i}.txt", f"gray {i}".encode()))], mode="w:gz")
    source = WebDatasetSource([str(tmp_path / "z.tar.gz")])
    iterator = iter(source)
    assert _drain(iterator, limit=2) == ["wds:z.tar.gz:z0", "wds:z.tar.gz:z1"]
    resumed = iter(source)
    resumed.set_state(iterator.get_state())
    assert _drain(resumed) == ["wds:z.tar.gz:z2", "wds:z.tar.gz:z3"]


def test_webdataset_shards_split_across_processes(wds_shards):
    from vlm_jax.data.sources.webdataset import WebDatasetSource
    pattern = str(wds_shards / "shard-*.tar")
    first = WebDatasetSource(pattern, process_index=0, process_count=2)
    second = WebDatasetSource(pattern, process_index=1, process_count=2)
    assert [os.path.basename(s) for s in first.shards] == ["shard-000.tar", "shard-002.tar"]
    assert [os.path.basename(s) for s in second.shards] == ["shard-001.tar", "shard-003.tar"]
    assert sorted(_drain(iter(first)) + _drain(iter(second))) == sorted(EXPECTED_WDS)
    with pytest.raises(ValueError, match="none for process"):
        WebDatasetSource(str(wds_shards / "shard-000.tar"), process_index=1, process_count=2)
    with pytest.raises(ValueError, match="no tar shards"):
        WebDatasetSource(str(wds_shards / "nothing-*.tar"))


def test_webdataset_repeat_counts_epochs(wds_shards):
    from vlm_jax.data.sources.webdataset import WebDatasetSource
    iterator = iter(WebDatasetSource(str(wds_shards / "shard-001.tar"), repeat=True))
    assert _drain(iterator, limit=7) == [f"wds:shard-001.tar:b{i % 3}" for i in range(7)]
    assert iterator.get_state()["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, no TensorFlow)

def _tiny_builder_class():
    """Defined lazily: importing tensorflow_datasets costs seconds, only the TFDS tests pay it."""
    import tensorflow_datasets as tfds

    class VlmJaxTinyVqa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "meta": {"caption": tfds.features.Text(), "number": np.int32}}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

        def _generate_examples(self, count):
            for i in range(count):
                answers = [f"answer {i}", "other"] if i != 2 else [""]
                yield i, {"picture": _png((60 * i, 0, 255)), "question": f"question {i}?",
                          "answers": answers, "meta": {"caption": f"caption {i}", "number": i}}

    return VlmJaxTinyVqa


def _conversation_or_reason(source, index):
    try:
        return source[index]["conversation"]
    except SkipExample as skip:
        return skip.reason


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = _tiny_builder_class()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_tfds_question_answer_and_caption_roles(tiny_tfds):
    from vlm_jax.data.sources.tfds import TfdsSource
    qa = TfdsSource(builder_dir=tiny_tfds.data_dir, split="train", features={
        "picture": "image", "question": "question", "answers": "answer", "meta/number": "id"})
    assert len(qa) == 4
    by_row, skipped = {}, []
    for index in range(len(qa)):  # TFDS stores rows in hashed-key order
        try:
            example = qa[index]
            by_row[example["meta"]["row_id"]] = example
        except SkipExample as skip:
            skipped.append(skip.reason)
    assert skipped == ["no_answer"] and sorted(by_row) == [0, 1, 3]  # row 2 has an empty answer
    example = by_row[1]
    assert example["conversation"] == [{"role": "user", "content": "<image>\nquestion 1?"},
                                       {"role": "assistant", "content": "answer 1"}]
    assert example["meta"]["answers"] == ["answer 1", "other"]
    np.testing.assert_array_equal(decode_image(example["images"][0])[0, 0], [60, 0, 255])
    restored = pickle.loads(pickle.dumps(qa))  # grain workers receive the source pickled
    assert [_conversation_or_reason(restored, i) for i in range(4)] == [
        _conversation_or_reason(qa, i) for i in range(4)]

    data_dir = os.path.dirname(os.path.dirname(tiny_tfds.data_dir))  # <data_dir>/<name>/<version>
    captions = TfdsSource(tiny_tfds.name, split="test", data_dir=data_dir,
                          features={"picture": "image", "meta/caption": "caption"})
    assert len(captions) == 2
    assert sorted(captions[i]["caption"] for i in range(2)) == ["caption 0", "caption 1"]
    assert captions[0]["conversation"] is None and len(captions[0]["images"]) == 1


def test_tfds_config_errors_name_the_problem(tiny_tfds):
    from vlm_jax.data.sources.tfds import TfdsSource
    with pytest.raises(ValueError, match="'pixels' not in the dataset"):
        TfdsSource(builder_dir=tiny_tfds.data_dir, features={"pixels": "image", "question": "caption"})
    with pytest.raises(ValueError, match="supported roles"):
        TfdsSource(builder_dir=tiny_tfds.data_dir, features={"picture": "photo"})
    with pytest.raises(ValueError, match="'answer' role"):
        TfdsSource(builder_dir=tiny_tfds.data_dir, features={"question": "question"})
