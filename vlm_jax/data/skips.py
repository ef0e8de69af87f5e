"""Bad records on their way through the pipeline: markers, the per-reason counter, the threshold.

A `SkipExample` raised by a source or a transform becomes a `SkippedExample` marker (never an
exception out of a worker); `SkipAccountingIterDataset`, after the workers in the main process,
counts markers by reason, drops them, and raises `TooManySkippedExamples` past the threshold.
The counters are part of the iterator state.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import grain

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.packing import RowSpec, example_length, example_num_images

logger = logging.getLogger("vlm_jax.data.pipeline")

@dataclasses.dataclass(frozen=True)
class SkippedExample:
    """Marker standing in for a dropped record on its way to the accounting stage."""
    reason: str
    detail: str
    example_id: str


class TooManySkippedExamples(RuntimeError):
    """The fraction of skipped raw examples passed `max_skip_fraction`."""


class GuardedSource:
    """A source whose bad records come back as `SkippedExample` instead of raising."""

    def __init__(self, source: Any, name: str):
        self._source = source
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Mapping[str, Any] | SkippedExample:
        try:
            return self._source[index]
        except SkipExample as skip:
            return SkippedExample(skip.reason, skip.detail, f"{self._name}[{index}]")

    def __repr__(self) -> str:
        return f"GuardedSource({self._source!r})"


class GuardedTransform:
    """raw example -> TOKENIZED EXAMPLE (+ its "id"), or the `SkippedExample` the transform raised."""

    def __init__(self, transform: Callable[[Mapping[str, Any]], dict]):
        self._transform = transform

    def __call__(self, raw: Mapping[str, Any] | SkippedExample) -> dict | SkippedExample:
        if isinstance(raw, SkippedExample):
            return raw
        try:
            example = dict(self._transform(raw))
        except SkipExample as skip:
            return SkippedExample(skip.reason, skip.detail, str(raw.get("id")))
        example["id"] = raw["id"]
        return example


class RowFitCheck:
    """Refuses examples that cannot fit an empty row ("too_long" / "too_many_images")."""

    def __init__(self, spec: RowSpec):
        self.spec = spec

    def __call__(self, example: Mapping[str, Any]) -> SkippedExample | None:
        length, num_images = example_length(example), example_num_images(example)
        if length > self.spec.seq_len:
            return SkippedExample("too_long", f"{length} tokens > seq_len {self.spec.seq_len}",
                                  str(example.get("id")))
        if num_images > self.spec.max_images:
            return SkippedExample("too_many_images", f"{num_images} images > max_images_per_row "
                                  f"{self.spec.max_images}", str(example.get("id")))
        return None


def one_image_check(example: Mapping[str, Any]) -> SkippedExample | None:
    """Contrastive pairs need exactly one image ("image_count")."""
    if example_num_images(example) == 1:
        return None
    return SkippedExample("image_count", f"{example_num_images(example)} images, a contrastive "
                          "pair needs exactly 1", str(example.get("id")))


ExampleCheck = Callable[[Mapping[str, Any]], "SkippedExample | None"]


class SkipAccountingIterDataset(grain.IterDataset):
    """Counts and drops `SkippedExample` markers and the examples `check` refuses; raises
    `TooManySkippedExamples` past the threshold."""

    def __init__(self, parent: grain.IterDataset, max_skip_fraction: float, min_seen: int,
                 check: ExampleCheck):
        super().__init__(parent)
        self._max_skip_fraction = max_skip_fraction
        self._min_seen = min_seen
        self._check = check

    def __iter__(self) -> "SkipAccountingIterator":
        return SkipAccountingIterator(self._parent.__iter__(), self._max_skip_fraction,
                                      self._min_seen, self._check)


class SkipAccountingIterator(grain.DatasetIterator):
    """State: {"parent": ..., "seen": raw examples seen, "skipped": {reason: count}}."""

    def __init__(self, parent: grain.DatasetIterator, max_skip_fraction: float, min_seen: int,
                 check: ExampleCheck):
        super().__init__(parent)
        self._max_skip_fraction = max_skip_fraction
        self._min_seen = min_seen
        self._check = check
        self._seen = 0
        self._skipped: dict[str, int] = {}

    def __next__(self) -> dict:
        while True:
            element = next(self._parent)
            self._seen += 1
            skip = element if isinstance(element, SkippedExample) else self._check(element)
            if skip is None:
                return element
            self._count(skip)

    def _count(self, skip: SkippedExample) -> None:
        first_of_its_kind = skip.reason not in self._skipped
        self._skipped[skip.reason] = self._skipped.get(skip.reason, 0) + 1
        log = logger.warning if first_of_its_kind else logger.debug
        log("skipped example %s (%s): %s", skip.example_id, skip.reason, skip.detail)
        num_skipped = sum(self._skipped.values())
        if self._seen >= self._min_seen and num_skipped > self._max_skip_fraction * self._seen:
            raise TooManySkippedExamples(
                f"skipped {num_skipped} of {self._seen} examples ({num_skipped / self._seen:.1%}) > "
                f"max_skip_fraction={self._max_skip_fraction:g} (checked after "
                f"{self._min_seen} examples); skipped by reason: {dict(sorted(self._skipped.items()))}")

    def skip_counts(self) -> dict[str, Any]:
        return {"seen": self._seen, "skipped": dict(sorted(self._skipped.items()))}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "seen": self._seen,
                "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._seen = int(state["seen"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
