"""The training loop: a validated config -> tokenizer, data, mesh, plan, state (fresh, init_from or
resumed), steps, periodic eval, logs and checkpoints, then the final model directory.

    metrics = train(config, workdir)      # config: ConfigDict from configs/*.py, or a RunConfig

A run lasts `train.steps` steps, or `train.epochs` passes over its data (it then ends with the
data, its lr schedule counts examples, and with several processes a process whose shard ended
first feeds empty batches until all have: every process stops at the same step). A run resumes
from the latest complete checkpoint in `workdir` by itself (a damaged one is reported and the one
before it used; a changed lr schedule is refused unless `allow_schedule_change`). SIGTERM
(preemption) or a first Ctrl-C saves at the next step boundary and returns with
`metrics["preempted"] = True` and `metrics["stopped_by"]` ("SIGTERM" / "Ctrl-C"); a second Ctrl-C
raises KeyboardInterrupt at once. A non-finite loss or gradient norm, or too many skipped
examples, stops the run with `TrainingStopped` naming the step and the last good checkpoint.
The finished run writes `workdir/model` (a model directory: generation, export and the next
phase's `train.init_from` read it).

Multi-process (one process per host, `vlm_jax/distributed.py`): every process runs this loop on
its own data shard and writes its own checkpoint shards; only process 0 writes the logs,
config.json, the tokenizer and the model directory's tokenizer and config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax import model_dir, sharding
from vlm_jax.config import to_dict
from vlm_jax.data.pipeline import TooManySkippedExamples, build_pipeline
from vlm_jax.errors import CheckpointError, TrainingStopped
from vlm_jax.train import checkpoint, flops, init_from, phases
from vlm_jax.train.metrics_log import RunLogger, flat_skip_counts
from vlm_jax.train.run_config import RunConfig, build_run_config
from vlm_jax.train.tokenizer import build_tokenizer
from vlm_jax.train.step import (NEXT_TOKEN_KEYS, TrainStepConfig, pair_keys,
                                batch_loss, create_train_state, make_train_step, plan_training)

CTRL_C_MESSAGE = ("Ctrl-C: saving a checkpoint at the next step and stopping; Ctrl-C again to "
                  "exit at once")


class _Preemption:
    """SIGTERM or a first Ctrl-C -> a flag the loop reads at step boundaries (it then saves and
    stops); a second Ctrl-C raises KeyboardInterrupt at once. Installed on the main thread only.

    With several processes SIGTERM is left to JAX's preemption service, which makes every process
    stop at the same step (`_Trainer._preempted`); a Python handler would hide the signal from it.
    A first Ctrl-C is passed on to that service as SIGTERM."""

    def __init__(self):
        self.requested = False
        self.reason: str | None = None  # what asked first: "SIGTERM" or "Ctrl-C"
        self._interrupts = 0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        several = jax.process_count() > 1
        if not several:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        if not several or jax.config.jax_enable_preemption_service:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.requested, self.reason = True, self.reason or "SIGTERM"

    def _on_sigint(self, signum, frame):
        del signum, frame
        self._interrupts += 1
        if self._interrupts > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        print(CTRL_C_MESSAGE, file=sys.stderr, flush=True)
        self.requested, self.reason = True, self.reason or "Ctrl-C"
        if jax.process_count() > 1:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier (C handler)

    def __exit__(self, *exc):
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum, previous in self._previous.items():  # None: one not set from Python
            signal.signal(signum, defaults[signum] if previous is None else previous)


def train(config: Any, workdir: str, allow_schedule_change: bool = False) -> dict:
    """Train per `config` in `workdir`; returns the last logged metrics (+ final eval).
    `allow_schedule_change`: resume a checkpoint whose train.steps / epochs / lr schedule
    differs from `config` (refused otherwise), going on under the new values."""
    if "://" in str(workdir):
        raise CheckpointError(f"workdir {workdir}: training writes through the local file API; mount "
                              f"the bucket (gcsfuse, as launch/tpu_pod.sh does) and pass the mount path")
    check_workdir(workdir)
    run = config if isinstance(config, RunConfig) else build_run_config(
        config, jax.device_count(), jax.process_count())
    if run.train.init_from.path:
        init_from.check_init_from(run)  # shapes only, before anything compiles
    os.makedirs(workdir, exist_ok=True)
    with _Preemption() as preemption:
        metrics = _Trainer(run, workdir, preemption, allow_schedule_change).run()
    if metrics["preempted"]:
        metrics["stopped_by"] = preemption.reason or "SIGTERM"  # another process's SIGTERM
    return metrics


# What a workdir may hold before its run's first checkpoint: the fitted tokenizer (written first)
# and the output log that `vlm-jax sweep --launcher local` opens before starting the run.
EARLY_WORKDIR_ENTRIES = ("tokenizer", "train.log")


def check_workdir(workdir: str) -> None:
    """Refuse a workdir this run must not write into: a file, a model directory (an easy slip for
    train.init_from.path), or a non-empty directory that no run wrote. A missing or empty one
    starts a run; a previous run's (checkpoints/, metrics.jsonl or its run config.json) resumes."""
    if not os.path.exists(workdir):
        return
    if not os.path.isdir(workdir):
        raise CheckpointError(f"workdir {workdir} is a file, not a directory; pick a new --workdir")
    config = _json_or_none(os.path.join(workdir, "config.json"))
    if (isinstance(config, dict) and config.get("format") == model_dir.FORMAT) \
            or os.path.isdir(os.path.join(workdir, "params")):
        raise CheckpointError(f"workdir {workdir} is a model directory (config.json, params/); training "
                              f"there would overwrite it. To start from that model, set "
                              f"train.init_from.path={workdir} (or the config's model= argument), and "
                              f"pick a new --workdir for the run")
    entries = sorted(os.listdir(workdir))
    is_run_config = isinstance(config, dict) and {"model", "data", "train"} <= set(config)
    ours = (os.path.isdir(os.path.join(workdir, "checkpoints")) or "metrics.jsonl" in entries
            or is_run_config or set(entries) <= set(EARLY_WORKDIR_ENTRIES))
    if not ours:
        shown = [e + "/" if os.path.isdir(os.path.join(workdir, e)) else e for e in entries]
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        raise CheckpointError(f"workdir {workdir} is not empty and holds no previous run (no "
                              f"checkpoints/, metrics.jsonl or run config.json); it holds "
                              f"{', '.join(shown[:8])}{more}. Pick a new or empty --workdir")


def _json_or_none(path: str) -> Any:
    """The parsed JSON file, or None when it is missing or not JSON (then it is not ours)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def batch_keys(phase_name: str, negatives: bool = False) -> tuple[str, ...]:
    """The batch arrays the step reads (the rest stays on the host); `negatives`: the data has
    hard-negative captions (data.negative_captions > 0)."""
    phase = phases.PhaseConfig(name=phase_name)
    if phase.reads_pairs:
        return pair_keys(phase, negatives)
    keys = NEXT_TOKEN_KEYS + ("segment_ids",)
    return keys + ("images",) if phase_name in ("align", "instruct") else keys


def batch_counts(batch: dict) -> tuple[int, int, int]:
    """(examples, real tokens, images) in a local batch."""
    if "text_ids" in batch:
        return len(batch["text_ids"]), 0, len(batch["text_ids"])
    segments = batch["segment_ids"]
    return (int(segments.max(axis=1).sum()), int((segments > 0).sum()),
            int(batch["num_images"].sum()) if "num_images" in batch else 0)


def batch_digest(batch: dict) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()


class _Trainer:
    def __init__(self, run: RunConfig, workdir: str, preemption: _Preemption,
                 allow_schedule_change: bool = False):
        self.cfg, self.workdir, self.preemption = run, workdir, preemption
        self.is_writer = jax.process_index() == 0
        self.tokenizer = build_tokenizer(run, workdir)
        self.mesh = sharding.make_mesh(run.mesh)
        self.data_iter = build_pipeline(run.data, self.tokenizer)
        self.by_epochs = run.train.epochs is not None
        optimizer = run.train.optimizer
        self.total_examples = None
        if self.by_epochs:  # the schedule spans every example of every epoch
            self.total_examples = run.train.epochs * self.data_iter.epoch_examples
            optimizer = dataclasses.replace(optimizer, total_steps=max(self.total_examples, 1))
        self.plan = plan_training(run.model, TrainStepConfig.from_train(
            run.train, optimizer=optimizer,
            schedule_unit="examples" if self.by_epochs else "steps"), self.mesh)
        self.keys = batch_keys(run.train.phase.name, run.data.negative_captions > 0)
        self.checkpointer = checkpoint.Checkpointer(workdir, run.checkpoint.keep,
                                                    run.checkpoint.async_save, run.to_dict(),
                                                    allow_schedule_change)
        self.last_saved: int | None = None
        self.trainable_groups = flops.trainable_groups(self.plan.lr_multipliers)
        dtype = run.model.dtype or (run.model.resolved("llm").dtype if run.model.llm is not None
                                    else run.model.resolved("vision").dtype)
        self.peak_flops = flops.peak_flops_per_device(
            dtype=dtype, configured=run.log.peak_flops_per_device,
            measure_cpu=run.log.measure_cpu_peak) if self.is_writer else None
        self._warn_unknown_flops()
        self._exhausted = False
        self._empty_batch = None

    # ------------------------------------------------------------------ setup

    def _warn_unknown_flops(self) -> None:
        """MFU would be logged (a peak is known) but the step's FLOPs cannot be counted: say so
        once; the rows then hold mfu: null."""
        missing = flops.missing_flop_formula(self.cfg.model, self.cfg.train.phase)
        if missing is not None and self.peak_flops is not None:
            logging.warning("%s has no FLOP formula in vlm_jax/train/flops.py: MFU is not "
                            "computed (mfu: null in the logs)", missing)

    def _initial_state(self, data_iter):
        rng = jax.random.key(self.cfg.train.seed)
        restored = self.checkpointer.restore_latest(checkpoint.abstract_train_state(self.plan),
                                                    data_iter)
        if restored is not None:
            state, latest = restored
            self.last_saved = latest
            return state, latest
        state = create_train_state(self.plan, rng)
        if self.cfg.train.init_from.path:
            state = init_from.apply_init_from(self.cfg, self.plan, state)
        else:
            self._warn_random_towers()
        return state, 0

    def _warn_random_towers(self) -> None:
        """align / instruct are meant to start from pretrained towers: say once when not."""
        phase = self.cfg.train.phase.name
        if phase in ("align", "instruct") and self.is_writer:
            logging.warning("train.phase=%s without train.init_from.path: the vision tower and "
                            "the LLM are randomly initialised, not pretrained; point "
                            "train.init_from.path at a model directory (vlm-jax import-hf) to "
                            "start from trained ones", phase)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        run, total = self.cfg, self.cfg.train.steps  # total: None in a run measured in epochs
        data_iter = self.data_iter
        try:
            state, start = self._initial_state(data_iter)
        except BaseException:
            self.checkpointer.close()  # orbax's threads must stop before the interpreter does
            raise
        if self.is_writer:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(run.to_dict(), f, indent=2)
        self.logger = RunLogger(self.workdir, total, start, self.is_writer, run.log.progress_bar,
                                run.log.tensorboard, run.log.batch_hash,
                                total_examples=self.total_examples)
        if start:
            self.logger.message(f"resumed from {self.checkpointer.directory}/{start}")
        if self.by_epochs:
            self.logger.message(f"{run.train.epochs} epoch(s) of {self.data_iter.epoch_examples} "
                                f"examples; the lr schedule spans {self.total_examples} examples")
        train_step = make_train_step(self.plan)
        self.eval_step = _make_eval_step(self.plan) if run.eval_data is not None else None
        step, pending, last_row, preempted = start, None, {}, False
        try:
            while total is None or step < total:
                if self._preempted(step):
                    preempted = True
                    break
                local = self._next_batch(data_iter, step)  # overlaps the previous step's compute
                if local is None:
                    break
                if pending is not None:
                    # The previous step must end before this one's clock starts: timing a step
                    # from its dispatch would miss the compute a synchronous backend does there.
                    last_row = self._finish_step(*pending, data_iter) or last_row
                clock = time.perf_counter()
                state, metrics = train_step(state, sharding.global_batch(
                    {k: local[k] for k in self.keys}, self.mesh))
                step += 1
                if run.log.batch_hash:
                    self.logger.batch_hash(step, batch_digest(local))
                pending = (step, metrics, batch_counts(local), clock)
                if step % run.checkpoint.every_steps == 0 or step == total:
                    last_row = self._finish_step(*pending, data_iter, force_row=True) or last_row
                    pending = None
                    self._save(step, state, data_iter)
                if self.eval_step is not None and run.eval.every_steps \
                        and step % run.eval.every_steps == 0 and step != total:
                    last_row.update(self._evaluate(step, state))
            if pending is not None:
                last_row = self._finish_step(*pending, data_iter, force_row=True) or last_row
            if self.last_saved != step:
                self._save(step, state, data_iter)
            self.checkpointer.wait()
            if preempted:
                self.logger.message(f"{self.preemption.reason or 'SIGTERM'}: saved checkpoint "
                                    f"{self.checkpointer.directory}/{step}; exiting")
                self.logger.write(step, {"event/preempted": 1.0})
            else:
                if self.eval_step is not None:
                    last_row.update(self._evaluate(step, state))
                model_dir.save_model(os.path.join(self.workdir, "model"), run.model,
                                     self.plan.model_params(state),  # params: every process
                                     self.tokenizer if self.is_writer else None,
                                     data=self._trained_data_settings(),
                                     generation_config=self._inherited_generation_config())
        finally:
            self.checkpointer.close()
            self.logger.close()
        return {**last_row, "step": step, "preempted": preempted,
                "checkpoint": f"{self.checkpointer.directory}/{step}"}

    def _trained_data_settings(self) -> dict:
        """What inference must repeat: the prompts' chat template, the image preprocessing and
        whether prompts attend bidirectionally (prefix-LM). A phase without prompts (lm,
        contrastive, itm) keeps the template of the model it started from."""
        data = self.cfg.data
        template = {"align": "plain", "instruct": data.template}.get(data.task)  # align: captions
        if template is None and self.cfg.train.init_from.path:
            template = model_dir.load_data_settings(model_dir.resolve_model_dir(
                self.cfg.train.init_from.path, "train.init_from.path"))["template"]
        settings = {"template": template, "pad_to_square": data.pad_to_square,
                    "prefix_lm": data.prefix_lm}
        if data.tiling.enabled:
            settings["tiling"] = to_dict(data.tiling)
        return settings

    def _inherited_generation_config(self) -> dict | None:
        """The HF generation config of the model this run started from (an import keeps its
        LLM's), carried along so that an export still knows the LLM's stop tokens."""
        if not self.cfg.train.init_from.path:
            return None
        source = model_dir.resolve_model_dir(self.cfg.train.init_from.path, "train.init_from.path")
        return model_dir.load_generation_config(source)

    def _preempted(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step
            return bool(self.checkpointer.manager.reached_preemption(step))
        return self.preemption.requested

    def _next_batch(self, data_iter, step: int) -> dict | None:
        """This process's next batch, or None when the run's data has ended. In a run measured
        in epochs with several processes, a process whose shard ended feeds empty batches (no
        example, no loss) until every process's shard has: all stop at the same step, and every
        example of every shard is trained on."""
        local = None
        if not self._exhausted:
            try:
                local = next(data_iter)
            except StopIteration:
                self._exhausted = True
            except TooManySkippedExamples as e:
                raise TrainingStopped(f"step {step + 1}: {e}; last good checkpoint: "
                                      f"{self._last_good()}") from e
        if self.by_epochs and jax.process_count() > 1:
            has_data = multihost_utils.process_allgather(np.int32(local is not None))
            if local is None and np.any(has_data):
                local = self._empty_batch
        if local is not None:
            if self._empty_batch is None and self.by_epochs and jax.process_count() > 1:
                self._empty_batch = {k: np.zeros_like(v) for k, v in local.items()}
            return local
        what = (f"{self.cfg.train.epochs} epoch(s)" if self.by_epochs
                else f"data.num_epochs={self.cfg.data.num_epochs}")
        self.logger.message(f"data ran out after step {step} ({what}); stopping")
        return None

    def _last_good(self) -> str:
        return ("none" if self.last_saved is None
                else f"{self.checkpointer.directory}/{self.last_saved}")

    def _finish_step(self, step: int, metrics, counts, started: float, data_iter,
                     force_row: bool = False) -> dict | None:
        """Fetch a step's metrics (blocks until it ran), stop on non-finite, log."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if values.pop("is_finite") != 1.0:
            self.checkpointer.wait()
            raise TrainingStopped(
                f"step {step}: loss {values['loss']} / grad norm {values['grad_norm']} is not "
                f"finite; the update was not applied. Last good checkpoint: {self._last_good()}")
        log_now = force_row or step % self.cfg.log.every_steps == 0
        examples_seen = values.get("examples_seen")
        if not log_now:
            self.logger.step(step, None, examples_seen)
            return None
        seconds = time.perf_counter() - started
        examples, tokens, images = (n * jax.process_count() for n in counts)
        row = {**values, "step_time_s": seconds, "examples_per_s": examples / seconds,
               "tokens_per_s": tokens / seconds if tokens else None}
        counts = data_iter.skip_counts()
        if examples_seen is not None:  # exact: examples trained on, over one pass's examples
            row["epoch"] = examples_seen / data_iter.epoch_examples
        elif data_iter.epoch_examples:  # raw examples this process read per pass over its shard
            row["epoch"] = counts["seen"] / (data_iter.epoch_examples / jax.process_count())
        if self.peak_flops is not None:
            seq_len = self.cfg.data.seq_len if "text_ids" not in self.keys else None
            step_flops = flops.train_step_flops(
                self.cfg.model, self.cfg.train.phase, self.cfg.data.batch_size * jax.process_count(),
                seq_len=seq_len, num_images=images, trainable=self.trainable_groups)
            row["mfu"] = flops.mfu(None if step_flops is None else step_flops.total, seconds,
                                   self.peak_flops, jax.device_count())  # None: FLOPs unknown
        row.update(flat_skip_counts(counts))
        self.logger.step(step, row, examples_seen)
        return row

    def _save(self, step: int, state, data_iter) -> None:
        self.checkpointer.save(step, state, data_iter.get_state())
        self.last_saved = step

    # ------------------------------------------------------------------ eval

    def _evaluate(self, step: int, state) -> dict:
        eval_iter = build_pipeline(self.cfg.eval_data, self.tokenizer)
        keys = batch_keys(self.cfg.train.phase.name, self.cfg.eval_data.negative_captions > 0)
        params = self.plan.model_params(state)
        totals: dict[str, float] = {}
        for _, local in zip(range(self.cfg.eval.num_batches), eval_iter):
            sums = jax.device_get(self.eval_step(params, sharding.global_batch(
                {k: local[k] for k in keys}, self.mesh)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = max(totals.get("count", 0.0), 1.0)
        row = {"eval/loss": totals.get("loss_sum", 0.0) / count}
        if "correct" in totals:
            row["eval/token_accuracy"] = totals["correct"] / count
        row["eval/count"] = totals.get("count", 0.0)
        self.logger.write(step, row)
        return row


def _make_eval_step(plan):
    """(params, batch) -> sums {loss_sum, count[, correct]} over the global batch (jitted): the
    train step's own loss (`step.batch_loss`) on the model params."""
    def eval_sums(params, batch):
        _, sums = batch_loss(plan, params, batch)
        return sums

    jitted = jax.jit(eval_sums)

    def run(params, batch):
        with sharding.rules_context(plan.mesh, plan.rules):
            return jitted(params, batch)
    return run
