"""The grain input pipeline: sources -> shard -> shuffle -> repeat -> transform -> mix -> skip
accounting -> rows (packed or not) -> batches, with an exactly resumable iterator state.

    it = build_pipeline(cfg, tokenizer)            # a grain DatasetIterator of BATCHes
    batch = next(it)
    state = it.get_state()                        # JSON-able; saved with the model checkpoint
    it.set_state(state)                           # exact resume, skip counters included
    it.skip_counts()                # {"seen": n, "skipped": {reason: n}, "truncated": n} for logs

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
    transform, or an example that cannot fit a row, becomes a `SkippedExample` marker that
    travels to the main process, where `SkipAccountingIterDataset` counts it by reason and drops
    it. Counting therefore happens in one place, after the workers, whatever `worker_count` is;
    a bad row is counted once however many epochs bring it back, examples cut to fit
    (`too_long="truncate"`) are counted apart, and the counters are part of the iterator state
    (a resumed run continues the counts of the run it resumes; see data/skips.py);
  * packing and batching are cheap numpy work and run in the main process. The last, partial
    batch of a finite run is padded with empty rows (segment 0); contrastive batches have no
    padding rows, so their last partial batch is dropped.

Each process may yield a different number of batches in a finite run (shards differ by one
example, and packing depends on lengths); a multi-host trainer should count steps, not epochs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from vlm_jax.config import from_dict
from vlm_jax.data import transforms
from vlm_jax.data.packing import (PackedRowsIterDataset, RowSpec, assemble_batch,
                                  check_image_dtype, example_num_images, single_example_row)
from vlm_jax.data.skips import (GuardedSource, GuardedTransform, RowFitCheck,
                                SkipAccountingIterDataset, SkipAccountingIterator, one_image_check)
from vlm_jax.data.skips import TooManySkippedExamples  # noqa: F401  (raised through the pipeline)
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.data.streams import OrderedThreadMapIterDataset, StreamSourceIterDataset
from vlm_jax.errors import ConfigError

logger = logging.getLogger(__name__)

TASKS = ("instruct", "align", "lm", "contrastive")
TOO_LONG_POLICIES = ("skip", "truncate")  # data.too_long; see data/transforms.py
# kind -> (module, class); the class is built with the source's `options` as keyword arguments.
SOURCE_KINDS = {
    "shapes": ("vlm_jax.data.sources.shapes", "ShapesSource"),
    "documents": ("vlm_jax.data.sources.documents", "DocumentsSource"),
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
            raise ConfigError(f"data source kind={self.kind!r}; supported: {tuple(SOURCE_KINDS)}")
        if not self.weight > 0:
            raise ConfigError(f"data source weight must be > 0, got {self.weight} ({self.kind})")


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
    negative_captions: int = 0          # "contrastive": hard-negative captions per example (its
                                        # `negative_captions` field) that the ITM phases score
    image_size: int = 224
    num_image_tokens: int = 196
    pad_to_square: bool = False         # LLaVA-1.5: pad images to a square of gray before resizing
    too_long: str = "skip"              # over seq_len: "skip" the row, or "truncate" it (whole
                                        # turns first; never an image token, see transforms.py)
    batch_size: int = 8
    packing: bool = True
    max_images_per_row: int = 4         # encoder images (tiles, with data.tiling) per packed row
    tiling: TilingConfig = TilingConfig()  # off; max_tiles = n * n: data/tiling.py
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
            raise ConfigError(f"data.task={self.task!r}; supported: {TASKS}")
        if self.too_long not in TOO_LONG_POLICIES:
            raise ConfigError(f"data.too_long={self.too_long!r}; supported: {TOO_LONG_POLICIES}")
        for name in ("seq_len", "image_size", "batch_size", "text_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_image_tokens", "max_images_per_row", "worker_count", "worker_buffer_size",
                     "read_threads", "prefetch_buffer_size", "min_seen_for_skip_check",
                     "shuffle_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.negative_captions < 0 or (self.negative_captions and self.task != "contrastive"):
            raise ConfigError(f"data.negative_captions={self.negative_captions}: a count >= 0 of "
                              f"hard-negative captions, for data.task='contrastive' only (got "
                              f"{self.task!r})")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.tiling.enabled and self.max_images_per_row < self.tiling.max_images:
            raise ConfigError(
                f"data.tiling.max_tiles={self.tiling.max_tiles}: one image can become "
                f"{self.tiling.max_images} encoder images (tiles + the global view), more than "
                f"data.max_images_per_row={self.max_images_per_row}; raise max_images_per_row")

    @property
    def row_spec(self) -> RowSpec:
        return RowSpec(self.seq_len, self.max_images_per_row, self.image_size)


# ----------------------------------------------------------------------------- assembly

class PipelineIterator(grain.DatasetIterator):
    """The pipeline's batches, state and skip counters.

    `skip_counts()` counts the raw examples that reached the main process so far (a bad row
    once, whatever the epoch; see `SkipAccountingIterator`): up to one example (the one the
    packer holds for its next row) ahead of the batches handed out.
    `get_state()` is exact, and restoring it restores the counters of that point.
    """

    def __init__(self, batches: grain.DatasetIterator):
        super().__init__(batches)
        self._accounting = _find_parent(batches, SkipAccountingIterator)
        self.epoch_examples: int | None = None  # set by build_pipeline_from

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
    iterator = PipelineIterator(iter(batches))
    # Raw examples in one pass over all sources (all processes), None when a stream has no size:
    # what "one epoch" means to a trainer that counts examples.
    sizes = [len(source) if hasattr(source, "__getitem__") else None for _, source, _ in sources]
    iterator.epoch_examples = None if None in sizes else sum(sizes)
    return iterator


def build_example_dataset(cfg: DataConfig, sources: Sequence[tuple[str, Any, float]],
                          transform: Callable[[Mapping[str, Any]], dict],
                          process_index: int | None = None,
                          process_count: int | None = None) -> grain.IterDataset:
    """This process's stream of TOKENIZED EXAMPLES (each with its source "id"), bad ones counted
    and dropped. The iterator of the returned dataset is a `SkipAccountingIterator`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} outside [0, process_count={process_count})")
    if not sources:
        raise ConfigError("no data sources: data.sources is empty")
    check = one_image_check if cfg.task == "contrastive" else RowFitCheck(cfg.row_spec)
    streams = []
    for number, (name, source, _) in enumerate(sources):
        guarded_transform = GuardedTransform(transform, name, check)
        if hasattr(source, "__getitem__"):
            streams.append(_random_access_examples(cfg, name, source, _fold_seed(cfg.seed, number),
                                                   guarded_transform, process_index, process_count))
        else:
            streams.append(_stream_examples(cfg, name, source, _fold_seed(cfg.seed, number),
                                            guarded_transform))
    mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(
        streams, weights=[weight for _, _, weight in sources])
    return SkipAccountingIterDataset(mixed, cfg.max_skip_fraction, cfg.min_seen_for_skip_check)


def _random_access_examples(cfg: DataConfig, name: str, source: Any, seed: int,
                            transform: "GuardedTransform", process_index: int,
                            process_count: int) -> grain.IterDataset:
    shard = grain.MapDataset.source(GuardedSource(source, name))[process_index::process_count]
    if len(shard) == 0:
        raise ConfigError(f"source {name} has {len(source)} examples: nothing for process "
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
                     transform: "GuardedTransform") -> grain.IterDataset:
    if cfg.worker_count > 0:
        raise ConfigError(f"worker_count={cfg.worker_count} with the stream source {name}: grain "
                          "workers slice random-access sources only (shapes, llava_json, tfds); "
                          "streams decode on read_threads, use worker_count=0")
    raw = StreamSourceIterDataset(source, name, cfg.num_epochs)
    if cfg.shuffle and cfg.shuffle_window > 1:
        raw = grain.experimental.WindowShuffleIterDataset(raw, window_size=cfg.shuffle_window,
                                                          seed=seed)
    return OrderedThreadMapIterDataset(raw, transform, cfg.read_threads, cfg.prefetch_buffer_size)


def stack_contrastive(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Contrastive examples -> {"images": u8[B, H, W, 3], "text_ids": i32[B, L],
    "text_lengths": i32[B] (when the examples have it: the ITM phases read it), and
    "negative_text_ids": i32[B, K, L] + "negative_text_lengths": i32[B, K] when they have
    hard-negative captions}."""
    images = []
    for example in examples:
        if example_num_images(example) != 1:
            raise ValueError(f"a contrastive example needs exactly one image, "
                             f"{example.get('id')} has {example_num_images(example)}")
        check_image_dtype(example)
        images.append(example["images"][0])
    batch = {"images": np.stack(images),
             "text_ids": np.stack([np.asarray(ex["text_ids"], np.int32) for ex in examples])}
    if all("text_lengths" in ex for ex in examples):  # what TokenizeContrastive writes
        batch["text_lengths"] = np.asarray([ex["text_lengths"] for ex in examples], np.int32)
    if all("negative_text_ids" in ex for ex in examples):
        for key in ("negative_text_ids", "negative_text_lengths"):
            batch[key] = np.stack([np.asarray(ex[key], np.int32) for ex in examples])
    return batch


def make_source(source_cfg: SourceConfig, process_index: int = 0, process_count: int = 1) -> Any:
    """The source object of one config entry (its class from SOURCE_KINDS, built with options;
    stream sources also get this process's index and count, to deal their shards)."""
    module_name, class_name = SOURCE_KINDS[source_cfg.kind]
    source_class = getattr(importlib.import_module(module_name), class_name)
    options = dict(source_cfg.options)
    if source_cfg.kind in STREAM_KINDS:
        options.update(process_index=process_index, process_count=process_count)
    try:
        return source_class(**options)
    except TypeError as e:  # an option the source does not take
        raise ConfigError(f"data source kind={source_cfg.kind!r} options: {e}") from None


def make_example_transform(cfg: DataConfig, tokenizer: Any) -> Callable[[Mapping[str, Any]], dict]:
    """raw example -> TOKENIZED EXAMPLE for `cfg.task` (see data/transforms.py)."""
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
