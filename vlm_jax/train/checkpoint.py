"""Training checkpoints (orbax): train state + data-iterator state + run config per step, resume
onto any mesh (`train/init_from.py` starts a phase from another model's params).

    workdir/checkpoints/<step>/state/       TrainState (trainable, frozen, opt_state, step)
    workdir/checkpoints/<step>/data_iter/   the pipeline iterator state, one JSON per process
    workdir/checkpoints/<step>/config/      the RunConfig that wrote it (JSON)

Saves are asynchronous (arrays are copied to host before `save` returns, so the train step may
donate them right after). Orbax writes into a temporary directory and renames it when complete,
so a crash mid-save leaves a `<step>.orbax-checkpoint-tmp-*` directory that is never listed as a
step, and a step directory without orbax's commit timestamp is skipped too (`is_complete`):
resume always picks the latest COMPLETE checkpoint. A complete one that does not restore (a file
truncated or deleted since) is reported in one line and moved to `workdir/damaged_checkpoints/`,
and the one before it is used (`restore_latest`); when none restores, resuming is refused.
A checkpoint of another model, phase or learning-rate schedule is refused (`check_compatible`).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vlm_jax.config import from_dict, to_dict
from vlm_jax.errors import CheckpointError, ConfigError
from vlm_jax.models.vlm import RUN_SETTINGS, VLMConfig
from vlm_jax.train import phases
from vlm_jax.train.step import TrainState

# train.* fields that shape the learning-rate schedule (the run's length included, since the
# schedule spans it): resuming under other values would bend the lr curve mid-run.
SCHEDULE_FIELDS = ("steps", "epochs", "optimizer.learning_rate", "optimizer.schedule",
                   "optimizer.warmup_steps", "optimizer.warmup_ratio", "optimizer.total_steps",
                   "optimizer.end_lr_ratio")


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint written for another model, phase or schedule (the message says which)."""


class _IteratorStateSnapshot:
    """The iterator state at save time. Grain's handler calls `get_state()` when it writes, which
    with async saves may be after the loop has moved on; a snapshot pins the saved position."""

    def __init__(self, state: dict):
        self._encoded = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._encoded


class Checkpointer:
    """orbax CheckpointManager over `workdir/checkpoints` with items state / data_iter / config."""

    def __init__(self, workdir: str, keep: int, async_save: bool, run_config: dict,
                 allow_schedule_change: bool = False):
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.allow_schedule_change = allow_schedule_change
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "config"))
        self.run_config = run_config

    def latest_step(self) -> int | None:
        """The newest COMPLETE step (see `is_complete`), or None. Incomplete step directories
        after it are deleted, so that the run can save those steps again."""
        self.manager.reload()
        latest, incomplete = None, []
        for step in sorted(self.manager.all_steps(), reverse=True):
            if is_complete(self.directory / str(step)):
                latest = step
                break
            incomplete.append(step)
        for step in incomplete:
            logging.warning("deleting incomplete checkpoint %s (no commit timestamp)",
                            self.directory / str(step))
            if jax.process_index() == 0:
                (self.directory / str(step)).rmtree()
        if incomplete:
            self.manager.reload()
        return latest

    def save(self, step: int, state: Any, data_iter_state: dict | None) -> None:
        items = dict(state=ocp.args.StandardSave(state),
                     config=ocp.args.JsonSave(self.run_config))
        if data_iter_state is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(
                _IteratorStateSnapshot(data_iter_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
        """The state at `step`, placed as `abstract_state`'s shardings (any mesh); `data_iter`
        is moved to the saved position in place."""
        where = f"{self.directory}/{step}"
        changes = check_compatible(self.saved_config(step), self.run_config, where,
                                   self.allow_schedule_change)
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        if changes and jax.process_index() == 0:
            logging.warning("resuming %s under a changed schedule (%s; --allow-schedule-change): "
                            "from step %d on the lr follows the new one", where,
                            ", ".join(changes), step)
        return state

    def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> tuple[Any, int] | None:
        """(state, step) of the newest complete checkpoint that restores (see `restore`), or
        None when there is none at all. A damaged one (a file truncated or deleted) is reported
        in one line and the one before it tried; once one restores, the damaged ones after it
        move to `workdir/damaged_checkpoints/` (kept to look at, and out of the way of this
        run's own save of those steps). When none restores, raises a CheckpointError naming
        the workdir: resuming never quietly turns into starting over."""
        latest = self.latest_step()
        if latest is None:
            return None
        candidates = [s for s in sorted(self.manager.all_steps(), reverse=True)
                      if s <= latest and is_complete(self.directory / str(s))]
        damaged = []
        _quiet_abandoned_reads()  # before the first attempt: a failing one reports as it fails
        for step in candidates:
            error = None
            try:
                state = self.restore(step, abstract_state, data_iter)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001
                # A damaged file surfaces as any type: tensorstore's read error as a bare
                # Exception, a deleted item as KeyError, truncated JSON as ValueError.
                error = e
            if not _all_processes_agree(error is None):
                error = error or RuntimeError("failed to restore in another process")
            if error is None:
                self._set_aside(damaged, step)
                return state, step
            damaged.append((step, _first_line(error)))
        shown = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
        raise CheckpointError(
            f"workdir {self.directory.parent}: no checkpoint restores ({shown}); they were left "
            f"in place. To start this run over, delete or move {self.directory}; or use a new "
            f"--workdir")

    def _set_aside(self, damaged: list[tuple[int, str]], resumed_step: int) -> None:
        if not damaged:
            return
        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step, reason in damaged:
                target = aside / str(step)
                suffix = 1
                while target.exists():  # damaged again after an earlier resume
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                (self.directory / str(step)).rename(target)
                logging.warning("checkpoint %s/%d is damaged (%s); moved it to %s, resuming from "
                                "step %d", self.directory, step, reason, target, resumed_step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vlm_jax: damaged checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_complete(step_dir: epath.Path) -> bool:
    """Orbax stamps `_CHECKPOINT_METADATA` with a commit time when a save finalizes. On a local
    disk orbax trusts the directory name alone (it renames a tmp dir when done), so a step
    directory copied or written by hand without that stamp would otherwise count as complete."""
    metadata = step_dir / "_CHECKPOINT_METADATA"
    if not metadata.exists():
        return False
    try:
        return json.loads(metadata.read_text()).get("commit_timestamp_nsecs") is not None
    except json.JSONDecodeError:
        return False


def _quiet_abandoned_reads() -> None:
    """A failed orbax restore abandons its other reads: as they finish, their tensorstore
    callbacks find orbax's event loop closed (`RuntimeError('Event loop is closed')`) and their
    orbax coroutines are collected with the same read error, each reported through
    sys.unraisablehook: dozens of tracebacks around our one-line message that say nothing more.
    Drop exactly those; any other unraisable error is still reported."""
    previous = sys.unraisablehook
    if getattr(previous, "vlm_jax_quiet_reads", False):
        return

    def hook(unraisable):
        value, source = unraisable.exc_value, unraisable.object
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if inspect.iscoroutine(source) and f"{os.sep}orbax{os.sep}" in source.cr_code.co_filename:
            return
        previous(unraisable)
    hook.vlm_jax_quiet_reads = True
    sys.unraisablehook = hook
    # The same abandoned reads as asyncio tasks and futures ("Task exception was never
    # retrieved", "_GatheringFuture exception was never retrieved") with the read error's
    # traceback, logged when they are collected (seen under load only; failed CI stop 26).
    logging.getLogger("asyncio").addFilter(_drop_abandoned_orbax_task)


def _drop_abandoned_orbax_task(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an orbax task or future whose exception nobody
    retrieved."""
    first_line = (str(record.msg).splitlines() or [""])[0]
    if not first_line.endswith("exception was never retrieved") or not record.exc_info:
        return True
    trace = record.exc_info[2]
    while trace is not None:
        if f"{os.sep}orbax{os.sep}" in trace.tb_frame.f_code.co_filename:
            return False
        trace = trace.tb_next
    return True


def _first_line(error: BaseException) -> str:
    """The root cause of `error` in one line (orbax wraps tensorstore's message, which names
    the file, in exceptions carrying a many-line spec)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds in every process (one process's damaged shard fails them all)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _typed_model(model: dict) -> dict:
    """A saved model section with the fields it predates filled in (the family's values, as
    when it was written); one that no longer builds is compared as written, so the difference
    is named field by field rather than raised here."""
    try:
        return to_dict(from_dict(VLMConfig, model, where="model"))
    except ConfigError:
        return model


def check_compatible(saved: dict, current: dict, where: str,
                     allow_schedule_change: bool = False) -> list[str]:
    """Refuse to resume from a checkpoint written for another model or another phase, or
    (unless `allow_schedule_change`) under another learning-rate schedule or run length
    (`SCHEDULE_FIELDS`). Returns the schedule changes let through, as "field saved -> new"."""
    def model_fields(config):
        flat = _flatten_dict(_typed_model(config["model"]))
        return {k: v for k, v in flat.items() if k.split(".")[-1] not in RUN_SETTINGS}
    saved_model, model = model_fields(saved), model_fields(current)
    differing = sorted(k for k in saved_model.keys() | model.keys()
                       if saved_model.get(k) != model.get(k))
    if differing:
        shown = ", ".join(f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {model.get(k)!r}"
                          for k in differing[:5])
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written for another model ({shown}); use a new --workdir or "
            f"the config that wrote it")
    if saved["train"]["phase"] != current["train"]["phase"]:
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written by train.phase={saved['train']['phase']}, the config "
            f"has train.phase={current['train']['phase']}; start the new phase in a new "
            f"--workdir with train.init_from.path pointing at this one")
    saved_train, train = _flatten_dict(saved["train"]), _flatten_dict(current["train"])
    changed = [k for k in SCHEDULE_FIELDS  # a field the checkpoint predates cannot be compared
               if k in saved_train and saved_train[k] != train.get(k)]
    changes = [f"train.{k} {saved_train[k]!r} -> {train.get(k)!r}" for k in changed]
    if changed and not allow_schedule_change:
        shown = ", ".join(f"train.{k}: checkpoint {saved_train[k]!r} vs config {train.get(k)!r}"
                          for k in changed)
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written under another schedule ({shown}); resuming would "
            f"bend its learning-rate curve mid-run. Resume with the checkpoint's values, or pass "
            f"--allow-schedule-change (train(..., allow_schedule_change=True)) to go on from "
            f"that step under the new values (the lr jumps to the new schedule's value there), "
            f"or use a new --workdir")
    return changes


def _flatten_dict(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def abstract_train_state(plan) -> Any:
    """ShapeDtypeStructs of the plan's TrainState carrying the plan's shardings (restore target)."""
    trainable, frozen = phases.split_trainable(nn.unbox(plan.abstract_boxed), plan.lr_multipliers)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                        frozen=frozen, opt_state=jax.eval_shape(plan.optimizer.init, trainable))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, plan.state_shardings)
