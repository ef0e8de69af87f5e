"""Run logging: a tqdm progress bar (ETA, step time, examples/s, tokens/s, MFU) and the same
metrics plus loss, lr, grad norm, eval and data-pipeline counters in `workdir/metrics.jsonl` and
TensorBoard event files under `workdir/tensorboard/`. Only process 0 writes.

A JSONL row is one flat dict: {"step": 20, "loss": ..., "lr": ..., "grad_norm": ...,
"step_time_s": ..., "examples_per_s": ..., "tokens_per_s": ..., "mfu": ... (when known),
"num_examples": ..., "epoch": ..., "examples_seen": ... (a run measured in epochs),
"data/seen": ..., "data/truncated": ..., "data/skipped/<reason>": ...}; eval rows hold
"eval/<metric>" keys.
With `log.batch_hash`, `workdir/data_hashes.jsonl` gets {"step", "hash"} for every step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import tqdm

from vlm_jax.train.event_file import EventFileWriter

PROGRESS_KEYS = (("loss", "loss", ".4f"), ("epoch", "epoch", ".2f"), ("step_time_s", "s/step", ".3f"),
                 ("examples_per_s", "ex/s", ".1f"), ("tokens_per_s", "tok/s", ".0f"),
                 ("mfu", "mfu", ".1%"))


def flat_skip_counts(counts: Mapping[str, Any]) -> dict[str, float]:
    """The pipeline's {"seen": n, "skipped": {reason: n}, "truncated": n} as flat log keys."""
    out = {"data/seen": float(counts["seen"]), "data/truncated": float(counts["truncated"])}
    out.update({f"data/skipped/{reason}": float(n) for reason, n in counts["skipped"].items()})
    return out


class RunLogger:
    """Writes rows and moves the progress bar; every method is a no-op off process 0."""

    def __init__(self, workdir: str, total_steps: int | None, start_step: int, enabled: bool,
                 progress_bar: bool = True, tensorboard: bool = True, batch_hash: bool = False,
                 total_examples: int | None = None):
        """The bar counts steps, or examples when `total_examples` is given (a run measured in
        epochs, whose step count is not known in advance)."""
        self.enabled = enabled
        self._metrics_file = self._hash_file = self._events = self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if batch_hash:
            self._hash_file = open(os.path.join(workdir, "data_hashes.jsonl"), "a")
        if tensorboard:
            self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))
        self._by_examples = total_examples is not None
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_examples if self._by_examples else total_steps,
                                  initial=0 if self._by_examples else start_step,
                                  unit="ex" if self._by_examples else "step",
                                  dynamic_ncols=True, file=sys.stderr)
        self._last_write = time.monotonic()

    def step(self, step: int, row: Mapping[str, float] | None,
             examples_seen: float | None = None) -> None:
        """Advance the bar to `step` (or to `examples_seen`); `row` (or None between log steps)
        goes to the files."""
        if not self.enabled:
            return
        if self._bar is not None:
            position = int(examples_seen) if self._by_examples and examples_seen is not None else (
                None if self._by_examples else step)
            if position is not None:
                self._bar.update(position - self._bar.n)
        if row is None:
            return
        if self._bar is not None:
            self._bar.set_postfix_str("  ".join(
                f"{label} {row[key]:{fmt}}" for key, label, fmt in PROGRESS_KEYS
                if row.get(key) is not None), refresh=False)
        self.write(step, row, prefix="train/")

    def write(self, step: int, row: Mapping[str, float], prefix: str = "") -> None:
        """One JSONL row and the matching TensorBoard scalars (`prefix` + key, unless the key
        already names its group, e.g. 'eval/loss' or 'data/seen')."""
        if not self.enabled:
            return
        # None is "unknown": kept for mfu (`"mfu": null` when FLOPs cannot be counted), dropped
        # elsewhere (a value the phase does not have), and never a TensorBoard scalar.
        row = {k: v for k, v in row.items() if v is not None or k == "mfu"}
        self._metrics_file.write(json.dumps({"step": step, **row}) + "\n")
        if self._events is not None:
            self._events.scalars(step, {(k if "/" in k else prefix + k): v for k, v in row.items()
                                        if v is not None})
        now = time.monotonic()
        if now - self._last_write > 5.0:  # a crash loses at most a few seconds of rows
            self.flush()
            self._last_write = now

    def batch_hash(self, step: int, digest: str) -> None:
        if self.enabled and self._hash_file is not None:
            self._hash_file.write(json.dumps({"step": step, "hash": digest}) + "\n")
            self._hash_file.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._metrics_file.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self._metrics_file.close()
        if self._hash_file is not None:
            self._hash_file.close()
        if self._events is not None:
            self._events.close()
        if self._bar is not None:
            self._bar.close()
