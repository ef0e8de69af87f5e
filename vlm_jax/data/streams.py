"""Stream sources (e.g. WebDataset) in the pipeline: repeated by epoch, and mapped on threads
in order with an exactly resumable state."""
from __future__ import annotations

import collections
import concurrent.futures
import copy
from typing import Any, Callable, Mapping

import grain

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.skips import SkippedExample
from vlm_jax.errors import DataError

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
                    raise DataError(f"stream source {self._name} ({self._source!r}) yielded "
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
