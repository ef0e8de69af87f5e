"""Bad records on their way through the pipeline: markers, the per-reason counter, the threshold.

A `SkipExample` raised by a source or a transform, or an example the pipeline's check refuses
(too long / too many images for a row, not one image for a contrastive pair), becomes a
`SkippedExample` marker (never an exception out of a worker); `SkipAccountingIterDataset`, after
the workers in the main process, counts markers by reason, drops them, counts the examples that
arrive `truncated`, and raises `TooManySkippedExamples` past the threshold.

A bad row is counted once, however many epochs bring it back: a marker carries `key`, the row's
identity (stable across epochs, unique per source row: "<source>[<index>]" when the source
refused it, "<source>:<example id>" when the transform or the check did), and the keys already
counted are part of the iterator state, with the counters. Reasons: the sources' and
transforms' own ("image_corrupt", "json_malformed", "too_long", ... see data/errors.py and
data/transforms.py) plus "too_long" / "too_many_images" (`RowFitCheck`) and "image_count"
(`one_image_check`).
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
    """Marker standing in for a dropped record on its way to the accounting stage. `example_id`
    is for the logs; `key` names the row for counting it once (None: count every occurrence)."""
    reason: str
    detail: str
    example_id: str
    key: str | None = None


class TooManySkippedExamples(RuntimeError):
    """The fraction of skipped raw examples passed `max_skip_fraction`."""


class GuardedSource:
    """A source whose bad records come back as `SkippedExample` instead of raising. `index` is
    the source's own (global) row index, so the key "<name>[<index>]" names the same row in every
    epoch and in every process."""

    def __init__(self, source: Any, name: str):
        self._source = source
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Mapping[str, Any] | SkippedExample:
        try:
            return self._source[index]
        except SkipExample as skip:
            key = f"{self._name}[{index}]"
            return SkippedExample(skip.reason, skip.detail, key, key)

    def __repr__(self) -> str:
        return f"GuardedSource({self._source!r})"


class GuardedTransform:
    """raw example -> TOKENIZED EXAMPLE (+ its "id"), or a `SkippedExample`: the one the transform
    raised or the one `check` returns for the transformed example. `source_name` qualifies the
    raw ids (unique within one source) into keys unique within the mixture."""

    def __init__(self, transform: Callable[[Mapping[str, Any]], dict], source_name: str,
                 check: "ExampleCheck | None" = None):
        self._transform = transform
        self._source_name = source_name
        self._check = check

    def __call__(self, raw: Mapping[str, Any] | SkippedExample) -> dict | SkippedExample:
        if isinstance(raw, SkippedExample):
            return raw
        key = None if raw.get("id") is None else f"{self._source_name}:{raw['id']}"
        try:
            example = dict(self._transform(raw))
        except SkipExample as skip:
            return SkippedExample(skip.reason, skip.detail, str(raw.get("id")), key)
        example["id"] = raw["id"]
        refused = None if self._check is None else self._check(example)
        if refused is not None:
            return dataclasses.replace(refused, key=key)
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
    """Counts and drops `SkippedExample` markers (each bad row once) and counts truncated
    examples; raises `TooManySkippedExamples` past the threshold."""

    def __init__(self, parent: grain.IterDataset, max_skip_fraction: float, min_seen: int):
        super().__init__(parent)
        self._max_skip_fraction = max_skip_fraction
        self._min_seen = min_seen

    def __iter__(self) -> "SkipAccountingIterator":
        return SkipAccountingIterator(self._parent.__iter__(), self._max_skip_fraction,
                                      self._min_seen)


class SkipAccountingIterator(grain.DatasetIterator):
    """State: {"parent": ..., "seen": n, "skipped": {reason: n}, "truncated": n,
    "counted_keys": [key, ...]} (a state without the last two restores with none).

    What is counted, with epochs (`num_epochs` > 1 brings every row back):
      * skipped: distinct bad rows. A marker whose key was counted before (the same row in a
        later epoch) is dropped again but counted nowhere, neither in `skipped` nor in `seen`.
        A marker without a key (a stream source's tar error, known only by its position) is
        counted each time it comes;
      * seen: good examples each time they come, plus the bad rows counted. The threshold
        compares skipped / seen: exactly "bad rows / rows seen" in the first epoch; later epochs
        add their good examples and only bad rows not met before (none, for a deterministic
        pipeline), so the fraction stays a fraction of rows, never inflated by repeats;
      * truncated: examples handed out cut to fit (`truncated` set by the transform), each time
        they come, as `seen` counts them: truncated / seen is the fraction of trained examples
        that were cut.
    The keys cost one string per distinct bad row, which `max_skip_fraction` bounds.
    """

    def __init__(self, parent: grain.DatasetIterator, max_skip_fraction: float, min_seen: int):
        super().__init__(parent)
        self._max_skip_fraction = max_skip_fraction
        self._min_seen = min_seen
        self._seen = 0
        self._skipped: dict[str, int] = {}
        self._truncated = 0
        self._counted_keys: set[str] = set()
        self._counted_keys_in_order: list[str] = []
        self._counted_keys_state: _KeysSnapshot | None = _KeysSnapshot()  # None: rebuild

    def __next__(self) -> dict:
        while True:
            element = next(self._parent)
            if not isinstance(element, SkippedExample):
                self._seen += 1
                self._truncated += int(element.get("truncated", 0))
                return element
            if element.key is None or element.key not in self._counted_keys:
                self._seen += 1
                self._count(element)

    def _count(self, skip: SkippedExample) -> None:
        if skip.key is not None:
            self._counted_keys.add(skip.key)
            self._counted_keys_in_order.append(skip.key)
            self._counted_keys_state = None
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
        return {"seen": self._seen, "skipped": dict(sorted(self._skipped.items())),
                "truncated": self._truncated}

    def get_state(self) -> dict[str, Any]:
        if self._counted_keys_state is None:
            self._counted_keys_state = _KeysSnapshot(self._counted_keys_in_order)
        return {"parent": self._parent.get_state(), "seen": self._seen,
                "skipped": dict(self._skipped), "truncated": self._truncated,
                "counted_keys": self._counted_keys_state}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._seen = int(state["seen"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._truncated = int(state.get("truncated", 0))
        self._counted_keys_in_order = [str(key) for key in state.get("counted_keys", [])]
        self._counted_keys = set(self._counted_keys_in_order)
        self._counted_keys_state = None


class _KeysSnapshot(tuple):
    """The counted keys as handed out in a state: immutable, so a deep copy is the object itself.
    The packer asks for (and deep-copies) the state before every example it reads; a plain list
    of tens of thousands of keys would cost milliseconds per row. JSON writes it as a list."""

    def __deepcopy__(self, memo: dict) -> "_KeysSnapshot":
        return self
