"""Rows of seq_len tokens from TOKENIZED EXAMPLES: greedy packing (or one example per row) and batching.

The packer decides which examples share a row (a row is the list of its examples);
`assemble_batch` then writes rows into the BATCH arrays. A row of the batch holds:

    input_ids, target_ids, positions, mask_ar, segment_ids: i32[T]   loss_mask: f32[T]
    images: u8[M, H, W, 3]    (the row's images in placeholder order, zeros after)
    num_images: i32[]         (how many of the M image slots are used)

Packed examples get segment ids 1..n in order; their own `positions` (0..len-1) are kept, so
positions restart at every segment. Padding has segment 0, loss_mask 0 and mask_ar 1 (a padding
token never opens a bidirectional block that real tokens could see).

`PackedRowsIterDataset` is a greedy next-fit packer: examples are never reordered, a row is
emitted when the next example's tokens or images do not fit. Its checkpoint state is the parent
iterator's state just before the first example of the row under construction, so a restore
re-reads that example and rebuilds exactly the same rows.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from vlm_jax.errors import ConfigError

TEXT_FIELDS = ("input_ids", "target_ids", "loss_mask", "positions", "mask_ar")
_TEXT_DTYPES = {"input_ids": np.int32, "target_ids": np.int32, "loss_mask": np.float32,
                "positions": np.int32, "mask_ar": np.int32}
# Padding value per field; mask_ar 1 keeps padding causal (see the module docstring).
_PAD_VALUES = {"input_ids": 0, "target_ids": 0, "loss_mask": 0.0, "positions": 0, "mask_ar": 1}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Shape of one row: seq_len tokens, up to max_images images of image_size x image_size."""
    seq_len: int
    max_images: int
    image_size: int

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.max_images < 0:
            raise ConfigError(f"max_images_per_row must be >= 0, got {self.max_images}")
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size}")


def example_length(example: Mapping[str, Any]) -> int:
    """Number of tokens of a TOKENIZED EXAMPLE."""
    return int(len(example["input_ids"]))


def example_num_images(example: Mapping[str, Any]) -> int:
    """Number of images of a TOKENIZED EXAMPLE (text-only examples may omit `images`)."""
    images = example.get("images")
    return 0 if images is None else int(len(images))


def fits_in_row(example: Mapping[str, Any], spec: RowSpec) -> bool:
    """Whether the example fits in an empty row at all."""
    return example_length(example) <= spec.seq_len and example_num_images(example) <= spec.max_images


def assemble_row(examples: Sequence[Mapping[str, Any]], spec: RowSpec) -> dict[str, np.ndarray]:
    """One padded row from the examples packed into it (segment ids 1..len(examples))."""
    return {name: value[0] for name, value in assemble_batch([examples], 1, spec).items()}


def assemble_batch(rows: Sequence[Sequence[Mapping[str, Any]]], batch_size: int,
                   spec: RowSpec) -> dict[str, np.ndarray]:
    """BATCH from rows, each row the list of examples packed into it; missing rows are padding.

    Every value is written once, straight into the batch arrays: images are most of the bytes
    (u8[B, M, S, S, 3]) and building rows first and stacking them would copy them twice more.
    """
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    batch = {name: np.full((batch_size, spec.seq_len), _PAD_VALUES[name], _TEXT_DTYPES[name])
             for name in TEXT_FIELDS}
    batch["segment_ids"] = np.zeros((batch_size, spec.seq_len), np.int32)
    batch["images"] = np.zeros((batch_size, spec.max_images, spec.image_size, spec.image_size, 3),
                               np.uint8)
    batch["num_images"] = np.zeros((batch_size,), np.int32)
    for row_index, examples in enumerate(rows):
        _check_row(examples, spec)
        start = image_start = 0
        for segment, example in enumerate(examples, start=1):
            end = start + example_length(example)
            for name in TEXT_FIELDS:
                batch[name][row_index, start:end] = example[name]
            batch["segment_ids"][row_index, start:end] = segment
            image_end = image_start + example_num_images(example)
            if image_end > image_start:
                batch["images"][row_index, image_start:image_end] = example["images"]
            start, image_start = end, image_end
        batch["num_images"][row_index] = image_start
    return batch


def check_image_dtype(example: Mapping[str, Any]) -> None:
    """Batches carry u8 images (normalised on the device): numpy would silently cast f32 pixels
    in [-1, 1] into them as meaningless bytes, so anything but DecodeImages' uint8 is refused."""
    images = example.get("images")
    if images is not None and len(images) and np.asarray(images).dtype != np.uint8:
        raise ValueError(f"{example.get('id')}: images must be uint8 (DecodeImages' resized "
                         f"pixels, normalised on the device), got {np.asarray(images).dtype}")


def _check_row(examples: Sequence[Mapping[str, Any]], spec: RowSpec) -> None:
    for example in examples:
        check_image_dtype(example)
    total_tokens = sum(example_length(ex) for ex in examples)
    total_images = sum(example_num_images(ex) for ex in examples)
    if total_tokens > spec.seq_len or total_images > spec.max_images:
        raise ValueError(f"{len(examples)} examples with {total_tokens} tokens and {total_images} "
                         f"images do not fit a row of {spec.seq_len} tokens / "
                         f"{spec.max_images} images")


def single_example_row(example: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The non-packed path: each example is a row of its own (a grain map transform)."""
    return [example]


class PackedRowsIterDataset(grain.IterDataset):
    """Greedy next-fit packing of TOKENIZED EXAMPLES into rows (see the module docstring).

    Every input example must fit an empty row (`fits_in_row`); the pipeline drops the others
    before packing and counts them as skipped.
    """

    def __init__(self, parent: grain.IterDataset, spec: RowSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> "_PackedRowsIterator":
        return _PackedRowsIterator(self._parent.__iter__(), self._spec)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._spec.seq_len}, max_images={self._spec.max_images})"


class _PackedRowsIterator(grain.DatasetIterator):
    """State: {"parent": parent state before the first example of the row being built}."""

    def __init__(self, parent: grain.DatasetIterator, spec: RowSpec):
        super().__init__(parent)
        self._spec = spec
        self._pending: Mapping[str, Any] | None = None  # read, but did not fit the last row
        self._pending_parent_state: dict | None = None  # parent state just before `_pending`
        self._exhausted = False

    def __next__(self) -> list[Mapping[str, Any]]:
        if self._pending is None:
            if self._exhausted:
                raise StopIteration
            first = next(self._parent)  # StopIteration here ends the stream: nothing buffered
        else:
            first, self._pending = self._pending, None
            self._pending_parent_state = None
        row = [self._check(first)]
        num_tokens = example_length(first)
        num_images = example_num_images(first)
        while True:
            state_before = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self._check(example)
            tokens, images = example_length(example), example_num_images(example)
            if num_tokens + tokens > self._spec.seq_len or num_images + images > self._spec.max_images:
                self._pending = example
                self._pending_parent_state = copy.deepcopy(state_before)
                break
            row.append(example)
            num_tokens += tokens
            num_images += images
        return row

    def _check(self, example: Mapping[str, Any]) -> Mapping[str, Any]:
        if not fits_in_row(example, self._spec):
            raise ValueError(
                f"an example of {example_length(example)} tokens / {example_num_images(example)} "
                f"images cannot fit a row of {self._spec.seq_len} tokens / "
                f"{self._spec.max_images} images; drop it before packing")
        return example

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"parent": copy.deepcopy(self._pending_parent_state)}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self._pending_parent_state = None
        self._exhausted = False

    def __str__(self) -> str:
        return f"PackedRowsIterator(seq_len={self._spec.seq_len})"
