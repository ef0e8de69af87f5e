"""The grain pipeline end to end on small fake sources: determinism, exact resume, per-process
shards, mixture weights, epochs, skip accounting (each bad row once over epochs, truncations
apart, in the state) and its threshold, too_long / pad_to_square through the real transforms,
config validation."""
import json

import numpy as np
import pytest

from vlm_jax.config import from_dict
from PIL import Image

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import normalize_pixels, preprocess_image, resize_image
from vlm_jax.data.pipeline import (DataConfig, SourceConfig, TooManySkippedExamples,
                                   build_pipeline, build_pipeline_from)
from vlm_jax.data.tokenizer import train_word_tokenizer
from vlm_jax.data.transforms import make_transform
from vlm_jax.train.metrics_log import flat_skip_counts

IMAGE_SIZE = 2
# Token t of example `number` of source `source_number` is source_number * 100_000 + number * 100 + t.
SOURCE_STRIDE, EXAMPLE_STRIDE = 100_000, 100


class CountingSource:
    """Raw examples carrying their number; every `bad_every`-th one raises SkipExample."""

    def __init__(self, size: int, source_number: int = 0, bad_every: int = 0):
        self.size, self.source_number, self.bad_every = size, source_number, bad_every

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if self.bad_every and index % self.bad_every == 0:
            raise SkipExample("image_missing", f"row {index}")
        return {"id": f"s{self.source_number}:{index}", "images": [b"x"] * (index % 2),
                "conversation": None, "caption": f"caption {index}",
                "meta": {"number": index, "source_number": self.source_number}}


class CountingStream:
    """The same examples as CountingSource, but as a stream source (like webdataset): iterate
    it; its iterator has get_state/set_state and raises SkipExample after moving past a bad row."""

    def __init__(self, size: int, source_number: int = 0, bad_every: int = 0):
        self.rows = CountingSource(size, source_number, bad_every)

    def __iter__(self):
        return CountingStreamIterator(self.rows)


class CountingStreamIterator:
    def __init__(self, rows):
        self.rows, self.position = rows, 0

    def __next__(self):
        if self.position >= len(self.rows):
            raise StopIteration
        self.position += 1
        return self.rows[self.position - 1]

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def counting_transform(raw):
    """TOKENIZED EXAMPLE whose tokens spell out where it came from; length 2..9 tokens."""
    number, source_number = raw["meta"]["number"], raw["meta"]["source_number"]
    if number % 13 == 5:
        raise SkipExample("no_answer", raw["id"])
    length = 2 + number % 8
    input_ids = (source_number * SOURCE_STRIDE + number * EXAMPLE_STRIDE + np.arange(length)).astype(np.int32)
    num_images = len(raw["images"])
    return {"input_ids": input_ids, "target_ids": np.append(input_ids[1:], 0).astype(np.int32),
            "loss_mask": np.ones(length, np.float32), "positions": np.arange(length, dtype=np.int32),
            "mask_ar": np.ones(length, np.int32),
            "images": np.full((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), number % 256, np.uint8),
            "text_ids": np.full((4,), number, np.int32)}


def config(**overrides) -> DataConfig:
    values = dict(sources=(), seq_len=24, image_size=IMAGE_SIZE, batch_size=3, max_images_per_row=2,
                  seed=7, max_skip_fraction=0.5, min_seen_for_skip_check=10)
    values.update(overrides)
    return DataConfig(**values)


def pipeline(cfg, sources, process_index=0, process_count=1):
    triples = [(f"fake{i}", source, weight) for i, (source, weight) in enumerate(sources)]
    return build_pipeline_from(cfg, triples, counting_transform, process_index, process_count)


def example_keys(batch) -> list[tuple[int, int]]:
    """(source_number, number) of every packed example in the batch, from its first token."""
    keys = []
    for input_ids, segment_ids in zip(batch["input_ids"], batch["segment_ids"]):
        for segment in np.unique(segment_ids[segment_ids > 0]):
            first = int(input_ids[segment_ids == segment][0])
            keys.append((first // SOURCE_STRIDE, first % SOURCE_STRIDE // EXAMPLE_STRIDE))
    return keys


def good_numbers(size, bad_every=0):
    return {n for n in range(size) if not (bad_every and n % bad_every == 0) and n % 13 != 5}


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for got_batch, want_batch in zip(got, want):
        assert got_batch.keys() == want_batch.keys()
        for name in want_batch:
            np.testing.assert_array_equal(got_batch[name], want_batch[name], err_msg=name)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_same_seed_same_batches_other_seed_other_order():
    first = take(pipeline(config(), [(CountingSource(50), 1)]), 10)
    assert_batches_equal(take(pipeline(config(), [(CountingSource(50), 1)]), 10), first)
    other = take(pipeline(config(seed=8), [(CountingSource(50), 1)]), 10)
    assert example_keys(other[0]) != example_keys(first[0])


@pytest.mark.parametrize("packing,read_threads", [(True, 0), (False, 2)])
def test_resume_mid_epoch_gives_the_same_next_50_batches(packing, read_threads):
    cfg = config(packing=packing, read_threads=read_threads, prefetch_buffer_size=8)
    sources = [(CountingSource(37, bad_every=6), 1), (CountingSource(23, 1), 1)]
    iterator = pipeline(cfg, sources)
    take(iterator, 9)  # mid-epoch: the mixed epoch is ~46 examples, ~6 batches; 9 crosses into the 2nd
    state = json.loads(json.dumps(iterator.get_state()))  # what an orbax checkpoint stores
    want = take(iterator, 50)
    resumed = pipeline(cfg, sources)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 50), want)
    # The skip counters are part of the state: both runs agree on what they skipped so far.
    assert resumed.skip_counts() == iterator.skip_counts()
    assert iterator.skip_counts()["skipped"]["image_missing"] > 0


@pytest.mark.parametrize("read_threads", [0, 2])
def test_stream_source_resumes_exactly_through_window_shuffle_and_threads(read_threads):
    # grain's window shuffle is slow for tiny windows (~60 ms / window size per element): 100.
    cfg = config(read_threads=read_threads, prefetch_buffer_size=5, shuffle_window=100)
    sources = [(CountingStream(290, bad_every=5), 1)]
    iterator = pipeline(cfg, sources)
    take(iterator, 11)  # mid-window, mid-epoch
    state = json.loads(json.dumps(iterator.get_state()))
    want = take(iterator, 50)
    resumed = pipeline(cfg, sources)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 50), want)
    assert resumed.skip_counts() == iterator.skip_counts()


def test_stream_epochs_and_mixing_with_a_random_access_source():
    cfg = config(num_epochs=2, read_threads=2, shuffle_window=100)
    keys = [key for batch in pipeline(cfg, [(CountingStream(150, bad_every=4), 1)])
            for key in example_keys(batch)]
    good = good_numbers(150, bad_every=4)
    assert sorted(number for _, number in keys) == sorted(list(good) * 2)
    assert [number for _, number in keys[:len(good)]] != sorted(good)  # the window shuffled
    mixed = pipeline(config(packing=False, batch_size=8, shuffle_window=100),
                     [(CountingSource(100, 0), 1.0), (CountingStream(100, 1), 1.0)])
    sources = [source for batch in take(mixed, 10) for source, _ in example_keys(batch)]
    assert 0.4 < np.mean(sources) < 0.6


def test_two_processes_read_disjoint_shards_that_cover_the_data():
    cfg = config(num_epochs=1)
    seen = []
    for process_index in range(2):
        keys = [key for batch in pipeline(cfg, [(CountingSource(41, bad_every=10), 1)],
                                          process_index, 2) for key in example_keys(batch)]
        assert len(keys) == len(set(keys))
        seen.append({number for _, number in keys})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == good_numbers(41, bad_every=10)
    assert abs(len(seen[0]) - len(seen[1])) <= 4


def test_mixture_weights_are_respected():
    cfg = config(packing=False, batch_size=10)
    iterator = pipeline(cfg, [(CountingSource(300, 0), 3.0), (CountingSource(300, 1), 1.0)])
    keys = [key for batch in take(iterator, 40) for key in example_keys(batch)]
    fraction_first = np.mean([source == 0 for source, _ in keys])
    assert 0.7 < fraction_first < 0.8, fraction_first


def test_epochs_repeat_every_good_example_once_each_reshuffled():
    cfg = config(num_epochs=3, packing=False, batch_size=4)
    iterator = pipeline(cfg, [(CountingSource(30, bad_every=7), 1)])
    keys = [key for batch in iterator for key in example_keys(batch)]
    good = good_numbers(30, bad_every=7)
    assert len(keys) == 3 * len(good)
    epochs = [[number for _, number in keys[i * len(good):(i + 1) * len(good)]] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(good)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # Each bad row is counted once, not once per epoch, whether the source refused it
    # (image_missing) or the transform did (no_answer); `seen` counts it once too.
    counts = iterator.skip_counts()
    bad_rows = 30 // 7 + 1
    assert counts["seen"] == 3 * len(good) + (30 - len(good))
    assert counts["skipped"] == {"image_missing": bad_rows, "no_answer": 30 - bad_rows - len(good)}


def test_skip_fraction_threshold_stops_the_run_naming_the_counts():
    cfg = config(max_skip_fraction=0.2, min_seen_for_skip_check=20)
    iterator = pipeline(cfg, [(CountingSource(100, bad_every=2), 1)])
    with pytest.raises(TooManySkippedExamples, match=r"image_missing.*max_skip_fraction|max_skip_fraction=0.2.*image_missing"):
        take(iterator, 100)
    # Under the threshold the same data runs to the end of the epoch.
    assert list(pipeline(config(max_skip_fraction=0.75, num_epochs=1),
                         [(CountingSource(100, bad_every=2), 1)]))


def test_examples_longer_than_seq_len_are_counted_as_too_long():
    iterator = pipeline(config(seq_len=6, num_epochs=1), [(CountingSource(16), 1)])
    keys = [key for batch in iterator for key in example_keys(batch)]
    lengths = {n: 2 + n % 8 for n in good_numbers(16)}
    assert {n for _, n in keys} == {n for n, length in lengths.items() if length <= 6}
    assert iterator.skip_counts()["skipped"]["too_long"] == sum(l > 6 for l in lengths.values())


def test_contrastive_batches():
    iterator = pipeline(config(task="contrastive", batch_size=2, num_epochs=1,
                               max_skip_fraction=0.9), [(CountingSource(20), 1)])
    batches = list(iterator)
    assert all(batch.keys() == {"images", "text_ids"} for batch in batches)
    assert batches[0]["images"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batches[0]["images"].dtype == np.uint8
    assert batches[0]["text_ids"].shape == (2, 4)
    # Odd rows have the one image a pair needs; even rows have none and are counted, not padded.
    numbers = [int(n) for batch in batches for n in batch["text_ids"][:, 0]]
    assert len(numbers) == 2 * (len({n for n in good_numbers(20) if n % 2}) // 2)
    assert all(n % 2 for n in numbers)
    np.testing.assert_array_equal(batches[0]["images"][:, 0, 0, 0], batches[0]["text_ids"][:, 0])
    assert iterator.skip_counts()["skipped"]["image_count"] == len({n for n in good_numbers(20) if not n % 2})


def test_config_from_dict_builds_sources_and_rejects_unknown_keys():
    cfg = from_dict(DataConfig, {"sources": [{"kind": "llava_json", "weight": 2.0,
                                              "options": {"path": "x.json"}}], "seq_len": 64})
    assert cfg.sources == (SourceConfig("llava_json", 2.0, {"path": "x.json"}),)
    with pytest.raises(ValueError, match="seq_lenn"):
        from_dict(DataConfig, {"sources": [], "seq_lenn": 3})
    with pytest.raises(ValueError, match="data.sources\\[0\\].wieght"):
        from_dict(DataConfig, {"sources": [{"kind": "tfds", "wieght": 1}]})
    with pytest.raises(ValueError, match="supported"):
        from_dict(DataConfig, {"sources": [{"kind": "parquet"}]})
    with pytest.raises(ValueError, match="task"):
        DataConfig(sources=(), task="caption")
    with pytest.raises(ValueError, match=r"data\.too_long='bogus'.*'skip', 'truncate'"):
        from_dict(DataConfig, {"sources": [], "too_long": "bogus"})
    assert from_dict(DataConfig, {"sources": [], "too_long": "truncate"}).too_long == "truncate"


def test_worker_processes_count_skips_like_the_main_process_and_resume_exactly():
    sources = [(CountingSource(41, bad_every=10), 1)]
    in_process = pipeline(config(num_epochs=2), sources)
    want_keys = sorted(key for batch in in_process for key in example_keys(batch))
    with_workers = pipeline(config(num_epochs=2, worker_count=1), sources)
    first = take(with_workers, 3)
    state = json.loads(json.dumps(with_workers.get_state()))
    rest = list(with_workers)
    assert sorted(key for batch in first + rest for key in example_keys(batch)) == want_keys
    assert with_workers.skip_counts() == in_process.skip_counts()
    with_workers.close()
    resumed = pipeline(config(num_epochs=2, worker_count=1), sources)
    resumed.set_state(state)
    assert_batches_equal(list(resumed), rest)
    assert resumed.skip_counts() == in_process.skip_counts()
    resumed.close()


@pytest.mark.parametrize("task,shapes_task", [("instruct", "qa"), ("align", "caption"),
                                              ("lm", "text"), ("contrastive", "caption")])
def test_build_pipeline_from_config_with_the_real_source_and_transforms(shapes_tokenizer, task,
                                                                        shapes_task):
    tokenizer = shapes_tokenizer
    cfg = from_dict(DataConfig, {
        "sources": [{"kind": "shapes", "options": {"task": shapes_task, "image_size": 32,
                                                   "num_examples": 12}}],
        "task": task, "template": "qwen2", "seq_len": 512, "image_size": 16, "num_image_tokens": 4,
        "batch_size": 2, "num_epochs": 1, "max_images_per_row": 0 if task == "lm" else 3})
    iterator = build_pipeline(cfg, tokenizer, process_index=0, process_count=1)
    batches = list(iterator)
    assert iterator.skip_counts() == {"seen": 12, "skipped": {}, "truncated": 0}
    if task == "contrastive":
        assert len(batches) == 6 and batches[0]["images"].shape == (2, 16, 16, 3)
        return
    segments = sum(len(np.unique(row[row > 0])) for b in batches for row in b["segment_ids"])
    assert segments == 12
    images_per_example = 0 if task == "lm" else 1
    assert sum(int(b["num_images"].sum()) for b in batches) == 12 * images_per_example
    image_token_count = sum(int((b["input_ids"] == tokenizer.image_token_id).sum()) for b in batches)
    assert image_token_count == 12 * images_per_example * cfg.num_image_tokens
    assert all(b["loss_mask"].sum() > 0 for b in batches)


class ConversationSource:
    """LLaVA-like rows with real images and conversations, for the real transforms."""

    def __init__(self, rows):
        self.rows = rows  # (num_images, conversation)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        num_images, conversation = self.rows[index]
        images = [np.full((6, 4, 3), 10 * index, np.uint8)] * num_images
        return {"id": f"conv:{index}", "images": images, "conversation": conversation,
                "caption": None, "meta": {}}


def _conversation(num_images, num_exchanges):
    turns = [{"role": "system", "content": "answer briefly"}]
    for number in range(num_exchanges):
        question = ("<image>" * num_images + "\n" if number == 0 else "") + "what color is it?"
        turns += [{"role": "user", "content": question},
                  {"role": "assistant", "content": f"a red circle {number}"}]
    return turns


TOO_LONG_ROWS = [(1, _conversation(1, 1)),    # fits
                 (1, _conversation(1, 30)),   # too long: truncated to its first exchanges
                 (5, _conversation(5, 1)),    # its five images alone are 5 x 16 = seq_len 80
                 (0, _conversation(0, 2))]    # fits, text only


CONVERSATION_TOKENIZER = train_word_tokenizer(
    ["what color is it? a red circle answer briefly 0 1 2 3"] * 4,
    special_tokens=["<|im_start|>", "<|im_end|>"])


def too_long_pipeline(too_long, **overrides):
    values = dict(sources=(), task="instruct", template="qwen2", seq_len=80, image_size=4,
                  num_image_tokens=16, batch_size=1, packing=False, max_images_per_row=5,
                  num_epochs=3, too_long=too_long, max_skip_fraction=1.0, read_threads=0)
    values.update(overrides)
    cfg = DataConfig(**values)
    return build_pipeline_from(cfg, [("conv0", ConversationSource(TOO_LONG_ROWS), 1.0)],
                               make_transform(cfg, CONVERSATION_TOKENIZER), 0, 1)


def test_too_long_rows_are_counted_once_over_epochs_and_truncations_apart():
    skipping = too_long_pipeline("skip")
    assert len(list(skipping)) == 3 * 2
    assert skipping.skip_counts() == {"seen": 3 * 2 + 2, "skipped": {"too_long": 2},
                                      "truncated": 0}
    truncating = too_long_pipeline("truncate")
    batches = list(truncating)
    assert len(batches) == 3 * 3
    # The truncated row keeps its image: every row with an image has its 16 image tokens.
    image_token_id = CONVERSATION_TOKENIZER.image_token_id
    for batch in batches:
        assert (batch["input_ids"] == image_token_id).sum() == 16 * batch["num_images"].sum()
    assert sum(int(b["num_images"].sum()) for b in batches) == 3 * 2  # rows 0 and 1, 3 epochs
    assert "truncated" not in batches[0]  # the marker is counted, never batched
    counts = truncating.skip_counts()
    assert counts == {"seen": 3 * 3 + 1, "skipped": {"too_long": 1}, "truncated": 3}
    assert flat_skip_counts(counts) == {"data/seen": 10.0, "data/truncated": 3.0,
                                        "data/skipped/too_long": 1.0}


def test_truncation_and_counted_rows_are_restored_from_the_state():
    uninterrupted = too_long_pipeline("truncate")
    list(uninterrupted)
    iterator = too_long_pipeline("truncate")
    take(iterator, 5)  # into the second epoch: the too-long row was counted in the first
    state = json.loads(json.dumps(iterator.get_state()))
    at_state = iterator.skip_counts()
    assert at_state["truncated"] >= 1 and at_state["skipped"] == {"too_long": 1}
    resumed = too_long_pipeline("truncate")
    resumed.set_state(state)
    assert resumed.skip_counts() == at_state
    list(resumed)
    assert resumed.skip_counts() == uninterrupted.skip_counts()
    # A state written before these counters existed restores with none.
    old = json.loads(json.dumps(state))

    def drop_new_keys(node):
        if isinstance(node, dict):
            if "counted_keys" in node:
                del node["counted_keys"], node["truncated"]
                return True
            return any(drop_new_keys(child) for child in node.values())
        return False

    assert drop_new_keys(old)
    resumed_old = too_long_pipeline("truncate")
    resumed_old.set_state(old)
    list(resumed_old)
    final = uninterrupted.skip_counts()
    assert resumed_old.skip_counts()["truncated"] == final["truncated"] - at_state["truncated"]


def test_pad_to_square_reaches_the_pixels():
    """The batch holds the resized uint8 pixels; normalised (as the vision tower does on the
    device) they are exactly the host's `preprocess_image`."""
    rgb = np.random.default_rng(3).integers(0, 256, (5, 8, 3), dtype=np.uint8)  # wide
    square = Image.new("RGB", (8, 8), (127, 127, 127))  # LLaVA-1.5 expand2square, SigLIP mean
    square.paste(Image.fromarray(rgb), (0, (8 - 5) // 2))
    expected = resize_image(np.asarray(square), 6)
    conversation = [{"role": "user", "content": "<image>\nwhat color is it?"},
                    {"role": "assistant", "content": "red"}]
    for pad_to_square in (True, False):
        tokenizer = train_word_tokenizer(["what color is it? red"] * 4)
        cfg = DataConfig(sources=(), task="instruct", template="minimal", seq_len=32,
                         image_size=6, num_image_tokens=2, batch_size=1, num_epochs=1,
                         pad_to_square=pad_to_square)
        batch = next(build_pipeline_from(
            cfg, [("pad0", _OneImageSource(rgb, conversation), 1.0)],
            make_transform(cfg, tokenizer), 0, 1))
        pixels = batch["images"][0, 0]
        assert batch["images"].dtype == np.uint8
        if pad_to_square:
            np.testing.assert_array_equal(pixels, expected)
            np.testing.assert_array_equal(normalize_pixels(pixels),
                                          preprocess_image(np.asarray(square), 6))
        else:
            assert np.abs(pixels.astype(np.int32) - expected).max() > 12


class _OneImageSource:
    def __init__(self, rgb, conversation):
        self.rgb, self.conversation = rgb, conversation

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"id": f"one:{index}", "images": [self.rgb], "conversation": self.conversation,
                "caption": None, "meta": {}}
