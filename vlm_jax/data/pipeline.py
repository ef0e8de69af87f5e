"""The grain input pipeline: sources -> shard -> shuffle -> repeat -> transform -> mix -> skip
accounting -> rows (packed or not) -> batches, with an exactly resumable iterator state.

    it = build_pipeline(cfg, tokenizer)            # a grain DatasetIterator of BATCHes
    batch = next(it)
    state = it.get_state()                        # JSON-able; saved with the model checkpoint
    it.set_state(state)                           # exact resume, skip counters included
    it.skip_counts()                              # {"seen": n, "skipped": {reason: n}} for logs

Order of operations, and why:
  * random-access sources (shapes, llava_json, tfds) are sharded by process first
    (`source[index::count]`: disjoint, covering), shuffled with a seed folded per source (so the
    shuffle never crosses process shards), repeated (`num_epochs`, None = forever; each epoch
    reshuffled), transformed on `read_threads` threads (PIL decode releases the GIL) and, with
    `worker_count > 0`, in grain worker processes (`mp_prefetch`);
  * stream sources (webdataset) deal their shards to processes themselves, are repeated here
    (epoch in the state), shuffled in a window of `shuffle_window` raw examples, and transformed
    on `read_threads` threads by `OrderedThreadMapIterDataset` (exact state, see there);
  * several sources are mixed by weight with grain's `IterDataset.mix`. With one source an epoch
    is exactly one pass; a mixture stops when its first source runs out of epochs;
  * bad records never raise out of a worker: a `SkipExample` from a source or from the
    transform becomes a `SkippedExample` marker that travels to the main process, where
    `SkipAccountingIterDataset` counts it by reason and drops it. Counting therefore happens in
    one place, after the workers, whatever `worker_count` is, and the counters are part of the
    iterator state (a resumed run continues the counts of the run it resumes);
  * packing and batching are cheap numpy work and run in the main process. The last, partial
    batch of a finite run is padded with empty rows (segment 0); contrastive batches have no
    padding rows, so their last partial batch is dropped.

Each process may yield a different number of batches in a finite run (shards differ by one
example, and packing depends on lengths); a multi-host trainer should count steps, not epochs.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import functools
import importlib
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from vlm_jax.config_utils import from_dict
from vlm_jax.data.errors import SkipExample
from vlm_jax.data.packing import (PackedRowsIterDataset, RowSpec, assemble_batch, example_length,
                                  example_num_images, single_example_row)

logger = logging.getLogger(__name__)

TASKS = ("instruct", "align", "lm", "contrastive")
# kind -> (module, class); the class is built with the source's `options` as keyword arguments.
SOURCE_KINDS = {
    "shapes": ("vlm_jax.data.sources.shapes", "ShapesSource"),
    "llava_json": ("vlm_jax.data.sources.llava_json", "LlavaJsonSource"),
    "webdataset": ("vlm_jax.data.sources.webdataset", "WebDatasetSource"),
    "tfds": ("vlm_jax.data.sources.tfds", "TfdsSource"),
}
# Stream sources are iterables that shard themselves: built with process_index / process_count.
STREAM_KINDS = ("webdataset",)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture: its kind, its mixing weight, and the kind's own options
    (keyword arguments of the source class, e.g. {"path": ..., "image_root": ...})."""
    kind: str
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data source kind={self.kind!r}; supported: {tuple(SOURCE_KINDS)}")
        if not self.weight > 0:
            raise ValueError(f"data source weight must be > 0, got {self.weight} ({self.kind})")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs. `num_image_tokens` comes from the model (the trainer fills
    it in); `batch_size` is per process."""
    sources: tuple[SourceConfig, ...]
    task: str = "instruct"              # "instruct" | "align" | "lm" | "contrastive"
    template: str = "vicuna"            # chat template name (see data/templates.py)
    seq_len: int = 512
    prefix_lm: bool = False             # PaliGemma style: image + prompt attend bidirectionally
    text_len: int = 64                  # caption tokens per example ("contrastive" only)
    image_size: int = 224
    num_image_tokens: int = 196
    batch_size: int = 8
    packing: bool = True
    max_images_per_row: int = 4
    shuffle: bool = True
    shuffle_window: int = 1000          # stream sources: raw examples shuffled together
    seed: int = 0
    num_epochs: int | None = None       # None = repeat forever
    worker_count: int = 0               # grain worker processes (0 = read in this process)
    worker_buffer_size: int = 2         # per-worker read-ahead, in examples
    read_threads: int = 2               # threads decoding + transforming examples (0 = inline)
    prefetch_buffer_size: int = 32      # read-ahead of the threads, in examples
    max_skip_fraction: float = 0.05     # stop when skipped / seen exceeds this ...
    min_seen_for_skip_check: int = 200  # ... once this many raw examples were seen

    def __post_init__(self):
        # from_dict turns a list of dicts into a tuple of dicts; build the SourceConfigs here.
        sources = tuple(s if isinstance(s, SourceConfig)
                        else from_dict(SourceConfig, s, f"data.sources[{i}]")
                        for i, s in enumerate(self.sources))
        object.__setattr__(self, "sources", sources)
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r}; supported: {TASKS}")
        for name in ("seq_len", "image_size", "batch_size", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_image_tokens", "max_images_per_row", "worker_count", "worker_buffer_size",
                     "read_threads", "prefetch_buffer_size", "min_seen_for_skip_check",
                     "shuffle_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")

    @property
    def row_spec(self) -> RowSpec:
        return RowSpec(self.seq_len, self.max_images_per_row, self.image_size)


# ----------------------------------------------------------------------------- bad data

@dataclasses.dataclass(frozen=True)
class SkippedExample:
    """Marker standing in for a dropped record on its way to the accounting stage."""
    reason: str
    detail: str
    example_id: str


class TooManySkippedExamples(RuntimeError):
    """The fraction of skipped raw examples passed `max_skip_fraction`."""


class _GuardedSource:
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
        return f"_GuardedSource({self._source!r})"


class _GuardedTransform:
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


# ----------------------------------------------------------------------------- streams

class StreamSourceIterDataset(grain.IterDataset):
    """An iterable source (its iterator has get_state/set_state) repeated for num_epochs, with
    `SkipExample` turned into `SkippedExample` markers. State: {"epoch", "source"}."""

    def __init__(self, source: Any, name: str, num_epochs: int | None):
        super().__init__()
        self._source, self._name, self._num_epochs = source, name, num_epochs

    def __iter__(self) -> "_StreamSourceIterator":
        return _StreamSourceIterator(self._source, self._name, self._num_epochs)


class _StreamSourceIterator(grain.DatasetIterator):

    def __init__(self, source: Any, name: str, num_epochs: int | None):
        super().__init__()
        self._source, self._name, self._num_epochs = source, name, num_epochs
        self._epoch = 0
        self._iterator = iter(source)
        self._epoch_is_empty = True  # an empty source repeated forever must not spin silently

    def __next__(self) -> Mapping[str, Any] | SkippedExample:
        while True:
            if self._num_epochs is not None and self._epoch >= self._num_epochs:
                raise StopIteration
            try:
                element = next(self._iterator)
            except SkipExample as skip:  # the source has already moved past the bad record
                element = SkippedExample(skip.reason, skip.detail, f"{self._name}@{self._epoch}")
            except StopIteration:
                if self._epoch_is_empty:
                    raise ValueError(f"stream source {self._name} ({self._source!r}) yielded "
                                     f"nothing in epoch {self._epoch}") from None
                self._epoch += 1
                self._epoch_is_empty = True
                self._iterator = iter(self._source)
                continue
            self._epoch_is_empty = False
            return element

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "source": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._iterator = iter(self._source)
        self._iterator.set_state(state["source"])
        self._epoch_is_empty = False  # restored mid-epoch: what came before is not replayed


class OrderedThreadMapIterDataset(grain.IterDataset):
    """`map(fn)` over an IterDataset on `num_threads` threads, in order, `buffer_size` ahead.

    The parent is read on the calling thread (cheap: raw bytes); only `fn` runs on the pool.
    State: the parent's state just before the oldest element not yet handed out, so a restore
    re-reads and re-maps exactly the elements that were in flight. num_threads=0 maps inline.
    """

    def __init__(self, parent: grain.IterDataset, fn: Callable[[Any], Any], num_threads: int,
                 buffer_size: int):
        super().__init__(parent)
        self._fn, self._num_threads = fn, num_threads
        self._buffer_size = max(buffer_size, num_threads)

    def __iter__(self) -> "_OrderedThreadMapIterator":
        return _OrderedThreadMapIterator(self._parent.__iter__(), self._fn, self._num_threads,
                                         self._buffer_size)


class _OrderedThreadMapIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, fn: Callable[[Any], Any], num_threads: int,
                 buffer_size: int):
        super().__init__(parent)
        self._fn, self._buffer_size = fn, buffer_size
        self._inline = num_threads == 0
        self._pool = (None if self._inline
                      else concurrent.futures.ThreadPoolExecutor(num_threads, "vlm-jax-map"))
        self._in_flight: collections.deque = collections.deque()  # (parent state before, future)
        self._exhausted = False

    def __next__(self) -> Any:
        if self._inline:
            return self._fn(next(self._parent))
        self._fill()
        if not self._in_flight:
            raise StopIteration
        _, future = self._in_flight.popleft()
        self._fill()  # keep the pool busy while the caller works on this element
        return future.result()

    def _fill(self) -> None:
        while not self._exhausted and len(self._in_flight) < self._buffer_size:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return
            self._in_flight.append((copy.deepcopy(state), self._pool.submit(self._fn, element)))

    def get_state(self) -> dict[str, Any]:
        if self._in_flight:
            return {"parent": copy.deepcopy(self._in_flight[0][0])}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._exhausted = False
        self._parent.set_state(state["parent"])

    def close(self) -> None:
        # Idempotent: grain's __del__ closes again, possibly during interpreter teardown.
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()


# ----------------------------------------------------------------------------- assembly

class PipelineIterator(grain.DatasetIterator):
    """The pipeline's batches, state and skip counters.

    `skip_counts()` counts every raw example that reached the main process so far: up to one
    example (the one the packer holds for its next row) ahead of the batches handed out.
    `get_state()` is exact, and restoring it restores the counters of that point.
    """

    def __init__(self, batches: grain.DatasetIterator):
        super().__init__(batches)
        self._accounting = _find_parent(batches, SkipAccountingIterator)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def skip_counts(self) -> dict[str, Any]:
        return self._accounting.skip_counts()


def build_pipeline(cfg: DataConfig, tokenizer: Any, process_index: int | None = None,
                   process_count: int | None = None) -> PipelineIterator:
    """This process's BATCH iterator for `cfg` (process index/count default to JAX's)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    sources = [(f"{s.kind}{i}", make_source(s, process_index, process_count), s.weight)
               for i, s in enumerate(cfg.sources)]
    return build_pipeline_from(cfg, sources, make_example_transform(cfg, tokenizer),
                               process_index, process_count)


def build_pipeline_from(cfg: DataConfig, sources: Sequence[tuple[str, Any, float]],
                        transform: Callable[[Mapping[str, Any]], dict],
                        process_index: int | None = None,
                        process_count: int | None = None) -> PipelineIterator:
    """`build_pipeline` with explicit (name, source, weight) triples and per-example transform.
    Random-access sources are sharded here; stream sources must already be this process's."""
    examples = build_example_dataset(cfg, sources, transform, process_index, process_count)
    if cfg.task == "contrastive":
        batches = examples.batch(cfg.batch_size, drop_remainder=True, batch_fn=stack_contrastive)
    else:
        spec = cfg.row_spec
        rows = (PackedRowsIterDataset(examples, spec) if cfg.packing
                else examples.map(single_example_row))
        batches = rows.batch(cfg.batch_size, batch_fn=functools.partial(
            assemble_batch, batch_size=cfg.batch_size, spec=spec))
    return PipelineIterator(iter(batches))


def build_example_dataset(cfg: DataConfig, sources: Sequence[tuple[str, Any, float]],
                          transform: Callable[[Mapping[str, Any]], dict],
                          process_index: int | None = None,
                          process_count: int | None = None) -> grain.IterDataset:
    """This process's stream of TOKENIZED EXAMPLES (each with its source "id"), bad ones counted
    and dropped. The iterator of the returned dataset is a `SkipAccountingIterator`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
    if not sources:
        raise ValueError("no data sources: data.sources is empty")
    guarded_transform = _GuardedTransform(transform)
    streams = []
    for number, (name, source, _) in enumerate(sources):
        if hasattr(source, "__getitem__"):
            streams.append(_random_access_examples(cfg, name, source, _fold_seed(cfg.seed, number),
                                                   guarded_transform, process_index, process_count))
        else:
            streams.append(_stream_examples(cfg, name, source, _fold_seed(cfg.seed, number),
                                            guarded_transform))
    mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(
        streams, weights=[weight for _, _, weight in sources])
    check = one_image_check if cfg.task == "contrastive" else RowFitCheck(cfg.row_spec)
    return SkipAccountingIterDataset(mixed, cfg.max_skip_fraction, cfg.min_seen_for_skip_check,
                                     check)


def _random_access_examples(cfg: DataConfig, name: str, source: Any, seed: int,
                            transform: "_GuardedTransform", process_index: int,
                            process_count: int) -> grain.IterDataset:
    shard = grain.MapDataset.source(_GuardedSource(source, name))[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"source {name} has {len(source)} examples: nothing for process "
                         f"{process_index} of {process_count}")
    if cfg.shuffle:
        shard = shard.shuffle(seed=seed)
    examples = shard.repeat(cfg.num_epochs).map(transform).to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))
    if cfg.worker_count > 0:
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return examples


def _stream_examples(cfg: DataConfig, name: str, source: Any, seed: int,
                     transform: "_GuardedTransform") -> grain.IterDataset:
    if cfg.worker_count > 0:
        raise ValueError(f"worker_count={cfg.worker_count} with the stream source {name}: grain "
                         "workers slice random-access sources only (shapes, llava_json, tfds); "
                         "streams decode on read_threads, use worker_count=0")
    raw = StreamSourceIterDataset(source, name, cfg.num_epochs)
    if cfg.shuffle and cfg.shuffle_window > 1:
        raw = grain.experimental.WindowShuffleIterDataset(raw, window_size=cfg.shuffle_window,
                                                          seed=seed)
    return OrderedThreadMapIterDataset(raw, transform, cfg.read_threads, cfg.prefetch_buffer_size)


def stack_contrastive(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Contrastive examples -> {"images": f32[B, H, W, 3], "text_ids": i32[B, L]}."""
    images = []
    for example in examples:
        if example_num_images(example) != 1:
            raise ValueError(f"a contrastive example needs exactly one image, "
                             f"{example.get('id')} has {example_num_images(example)}")
        images.append(example["images"][0])
    return {"images": np.stack(images).astype(np.float32),
            "text_ids": np.stack([np.asarray(ex["text_ids"], np.int32) for ex in examples])}


def make_source(source_cfg: SourceConfig, process_index: int = 0, process_count: int = 1) -> Any:
    """The source object of one config entry (its class from SOURCE_KINDS, built with options;
    stream sources also get this process's index and count, to deal their shards)."""
    module_name, class_name = SOURCE_KINDS[source_cfg.kind]
    source_class = getattr(importlib.import_module(module_name), class_name)
    options = dict(source_cfg.options)
    if source_cfg.kind in STREAM_KINDS:
        options.update(process_index=process_index, process_count=process_count)
    return source_class(**options)


def make_example_transform(cfg: DataConfig, tokenizer: Any) -> Callable[[Mapping[str, Any]], dict]:
    """raw example -> TOKENIZED EXAMPLE for `cfg.task` (see data/transforms.py)."""
    from vlm_jax.data import transforms
    return transforms.make_transform(cfg, tokenizer, prefix_lm=cfg.prefix_lm)


def _fold_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _find_parent(iterator: grain.DatasetIterator, kind: type) -> Any:
    to_visit = [iterator]
    while to_visit:
        current = to_visit.pop()
        if isinstance(current, kind):
            return current
        to_visit.extend(current._parents)  # pylint: disable=protected-access
    raise ValueError(f"no {kind.__name__} in the iterator chain of {iterator}")
