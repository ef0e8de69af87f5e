"""Packing invariants: no token lost or duplicated, segments isolated by the model's mask builder,
positions restart, images follow their examples, exact resume, the non-packed path."""
import grain
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data.packing import PackedRowsIterDataset, RowSpec, assemble_batch, assemble_row
from vlm_jax.models.layers import make_attention_mask

SPEC = RowSpec(seq_len=16, max_images=3, image_size=2)


def make_example(number: int, length: int, num_images: int, prefix_len: int = 0) -> dict:
    """Tokens number*100 + t (unique across examples); prefix_len > 0 makes it prefix-LM."""
    input_ids = (number * 100 + np.arange(length)).astype(np.int32)
    mask_ar = np.ones(length, np.int32)
    mask_ar[:prefix_len] = 0
    return {"input_ids": input_ids,
            "target_ids": np.append(input_ids[1:], 0).astype(np.int32),
            "loss_mask": (np.arange(length) >= prefix_len).astype(np.float32),
            "positions": np.arange(length, dtype=np.int32),
            "mask_ar": mask_ar,
            "images": np.full((num_images, 2, 2, 3), number % 255 + 1, np.uint8),  # never 0
            "id": f"ex{number}"}


def random_examples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    examples = []
    for number in range(count):
        length = int(rng.integers(1, SPEC.seq_len + 1))
        prefix_len = int(rng.integers(0, length)) if number % 2 else 0
        examples.append(make_example(number, length, int(rng.integers(0, SPEC.max_images + 1)),
                                     prefix_len))
    return examples


def pack(examples: list[dict], spec: RowSpec = SPEC) -> list[dict]:
    stream = grain.MapDataset.source(examples).to_iter_dataset()
    return [assemble_row(row, spec) for row in PackedRowsIterDataset(stream, spec)]


def expected_mask(row: dict) -> np.ndarray:
    """Independent numpy mask: same non-zero segment, and within a segment key j is visible from
    query i iff j <= i or both lie in the segment's bidirectional prefix."""
    segment_ids = row["segment_ids"]
    seq_len = len(segment_ids)
    mask = np.zeros((seq_len, seq_len), bool)
    for segment in set(segment_ids.tolist()) - {0}:
        where = np.flatnonzero(segment_ids == segment)
        start = where[0]
        mask_ar = row["mask_ar"][where]
        prefix_len = int(np.argmax(mask_ar == 1)) if mask_ar.any() else len(where)
        for i in where:
            for j in where:
                local_i, local_j = i - start, j - start
                mask[i, j] = local_j <= max(local_i, prefix_len - 1)
    return mask


def test_packing_keeps_every_token_once_in_order_and_isolates_segments():
    examples = random_examples(40)
    rows = pack(examples)
    assert len(rows) < len(examples)  # something was actually packed together
    tokens = np.concatenate([row["input_ids"][row["segment_ids"] > 0] for row in rows])
    np.testing.assert_array_equal(tokens, np.concatenate([ex["input_ids"] for ex in examples]))
    model_masks = np.asarray(make_attention_mask(
        jnp.asarray(np.stack([row["mask_ar"] for row in rows])),
        jnp.asarray(np.stack([row["segment_ids"] for row in rows]))))[:, 0]
    for row, model_mask in zip(rows, model_masks):
        np.testing.assert_array_equal(model_mask, expected_mask(row))
        padding = row["segment_ids"] == 0
        assert not model_mask[:, padding].any() and not model_mask[padding].any()
        assert (row["loss_mask"][padding] == 0).all()


def test_positions_restart_and_segments_number_from_one():
    rows = pack(random_examples(30, seed=1))
    for row in rows:
        segments = row["segment_ids"]
        used = segments[segments > 0]
        np.testing.assert_array_equal(np.unique(used), np.arange(1, used.max() + 1))
        assert (np.diff(used) >= 0).all()  # segments are contiguous and increasing
        for segment in np.unique(used):
            np.testing.assert_array_equal(row["positions"][segments == segment],
                                          np.arange((segments == segment).sum()))


def test_images_follow_their_examples_and_overflow_starts_a_new_row():
    # Two tokens each, so only images limit the packing: 2 + 2 > 3 images forces a new row.
    examples = [make_example(0, 2, 2), make_example(1, 2, 2), make_example(2, 2, 1),
                make_example(3, 2, 0)]
    rows = pack(examples)
    assert [row["num_images"].item() for row in rows] == [2, 3]
    np.testing.assert_array_equal(rows[0]["segment_ids"][:2], [1, 1])
    assert (rows[0]["segment_ids"][2:] == 0).all()
    np.testing.assert_array_equal(rows[0]["images"][:2], examples[0]["images"])
    np.testing.assert_array_equal(rows[1]["images"], np.concatenate(
        [examples[1]["images"], examples[2]["images"]]))
    assert (rows[0]["images"][2:] == 0).all()
    np.testing.assert_array_equal(rows[1]["segment_ids"][:6], [1, 1, 2, 2, 3, 3])


def test_packer_resumes_exactly_even_with_an_example_waiting():
    examples = random_examples(60, seed=2)
    stream = PackedRowsIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), SPEC)
    reference = [[ex["id"] for ex in row] for row in stream]
    for rows_before_save in (1, 4, 7):
        iterator = iter(stream)
        for _ in range(rows_before_save):
            next(iterator)
        state = iterator.get_state()
        resumed = iter(stream)
        resumed.set_state(state)
        assert [[ex["id"] for ex in row] for row in resumed] == reference[rows_before_save:]


def test_unpacked_rows_hold_one_example_padded():
    examples = random_examples(5, seed=3)
    rows = [assemble_row([ex], SPEC) for ex in examples]
    for row, example in zip(rows, examples):
        length = len(example["input_ids"])
        np.testing.assert_array_equal(row["segment_ids"], (np.arange(SPEC.seq_len) < length) * 1)
        np.testing.assert_array_equal(row["input_ids"][:length], example["input_ids"])
        np.testing.assert_array_equal(row["loss_mask"][length:], 0)
        assert row["num_images"] == len(example["images"])


def test_partial_batch_is_padded_with_empty_rows_and_overfull_rows_raise():
    stream = grain.MapDataset.source(random_examples(5, seed=4)).to_iter_dataset()
    first_row = next(iter(PackedRowsIterDataset(stream, SPEC)))
    batch = assemble_batch([first_row], batch_size=3, spec=SPEC)
    for name, value in assemble_row(first_row, SPEC).items():
        np.testing.assert_array_equal(batch[name][0], value)
    assert batch["input_ids"].shape == (3, SPEC.seq_len)
    assert batch["images"].shape == (3, SPEC.max_images, 2, 2, 3)
    assert batch["images"].dtype == np.uint8
    assert (batch["segment_ids"][1:] == 0).all() and (batch["num_images"][1:] == 0).all()
    with pytest.raises(ValueError, match="do not fit a row"):
        assemble_row([make_example(0, 10, 0), make_example(1, 10, 0)], SPEC)


def test_batches_hold_uint8_images_and_refuse_float_ones():
    """Images travel as bytes and are normalised on the device: a float image (e.g. already in
    [-1, 1]) written into the uint8 batch would silently become 0s and 1s, so it is refused."""
    example = make_example(0, 2, 1)
    assert assemble_row([example], SPEC)["images"].dtype == np.uint8
    normalised = dict(example, images=example["images"] / 127.5 - 1)
    with pytest.raises(ValueError, match="images must be uint8"):
        assemble_row([normalised], SPEC)
