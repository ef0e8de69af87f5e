"""Sweeps: a config file's `sweep()` expanded into runs, validated, launched, and reported.

A config file may define `sweep()` returning a list of override dicts, each one run, keyed by
dotted config paths (what `--config.a.b=V` takes). Build the list with `product` and `zip_`:

    def sweep():
        return product(**{"train.optimizer.learning_rate": [1e-3, 3e-3],
                          "train.optimizer.warmup_steps": [2, 5]})        # 4 runs

Command line:

    vlm-jax sweep --config configs/tiny.py:steps=20 --workdir runs/sweep --launcher local
    vlm-jax sweep --report --workdir runs/sweep

Each run gets a name derived from its overrides (filesystem-safe, distinct) and the workdir
ROOT/NAME. Every run's config is validated (`build_run_config`) before any run starts, so a typo
in the tenth run fails in the first second. Launchers: `local` runs `vlm-jax train` for each
run, one after another; `tpu` / `slurm` hand each run to `launch/tpu_pod.sh` /
`launch/slurm_gpu.sbatch` (submitted by `launch/slurm_submit.sh`); `print` only prints the `vlm-jax train` commands.
`ROOT/sweep.json` records the runs, their commands and (local) exit codes. `--report` reads the
last row of each run's `metrics.jsonl` and writes `ROOT/report.md` and `ROOT/report.json`.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import jax
from etils import epath

from vlm_jax.config import load_module
from vlm_jax.errors import ConfigError, InputError
from vlm_jax.train import run_config

LAUNCHERS = ("local", "tpu", "slurm", "print")
REPORT_METRICS = ("loss", "token_accuracy", "eval/loss", "eval/token_accuracy", "step_time_s")
MAX_NAME_LENGTH = 100


# ----------------------------------------------------------------------------- building sweeps

def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination: product(a=[1, 2], b=[3, 4]) -> 4 dicts (the last key varies fastest).
    Keys are dotted config paths; pass them with ** when they contain dots."""
    _check_axes(axes)
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zip_(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Values paired position by position: zip_(a=[1, 2], b=[3, 4]) -> [{a:1, b:3}, {a:2, b:4}]."""
    _check_axes(axes)
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zip_: every axis needs the same number of values, got {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*axes.values())]


def combine(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The product of sweeps: combine(zip_(lr=..., warmup=...), product(seed=[0, 1]))."""
    runs: list[dict[str, Any]] = [{}]
    for sweep in sweeps:
        runs = [{**left, **right} for left in runs for right in sweep]
    return runs


def _check_axes(axes: Mapping[str, Sequence[Any]]) -> None:
    if not axes:
        raise ConfigError("a sweep needs at least one axis")
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
            raise ConfigError(f"sweep axis {key!r} needs a non-empty list of values, got {values!r}")


# ----------------------------------------------------------------------------- expansion

def format_value(value: Any) -> str:
    """An override value as `--config.x=` text that the config parser reads back."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def run_names(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
    """One filesystem-safe, distinct name per run, from its overrides: `learning_rate=0.001,
    warmup_steps=2` -> `learning_rate-0.001_warmup_steps-2`. A key is shortened to its last
    component unless that is ambiguous in this sweep; long or colliding names get a hash."""
    keys = sorted({key for overrides in sweep for key in overrides})
    last = [key.rsplit(".", 1)[-1] for key in keys]
    short = {key: (tail if last.count(tail) == 1 else key) for key, tail in zip(keys, last)}
    names = []
    for index, overrides in enumerate(sweep):
        text = "_".join(f"{short[key]}-{format_value(value)}" for key, value in overrides.items())
        name = re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_.") or f"run{index}"
        if len(name) > MAX_NAME_LENGTH:
            name = name[:MAX_NAME_LENGTH - 9] + "-" + _digest(text)
        names.append(name)
    for index, name in enumerate(names):
        if names.count(name) > 1:  # e.g. values that differ only in characters replaced above
            names[index] = f"{name}-{index}"
    return names


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def load_sweep(config_spec: str) -> list[dict[str, Any]]:
    """The list of override dicts that the config file's `sweep()` returns (checked)."""
    path = config_spec.partition(":")[0]
    module = load_module(path)
    if not hasattr(module, "sweep"):
        raise ConfigError(f"{path} has no sweep() function; define one returning a list of "
                          f"override dicts (see vlm_jax/sweep.py)")
    sweep = module.sweep()
    if not isinstance(sweep, (list, tuple)) or not sweep:
        raise ConfigError(f"{path}: sweep() must return a non-empty list of override dicts")
    for index, overrides in enumerate(sweep):
        if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
            raise ConfigError(f"{path}: sweep()[{index}] is not a dict of dotted config keys")
    return [dict(overrides) for overrides in sweep]


def expand(config_spec: str, root: str, common_overrides: Sequence[str] = ()) -> list[dict]:
    """The sweep's runs: [{name, workdir, overrides: ["a.b=V", ...]}], command-line overrides
    first (they may not also be swept)."""
    sweep = load_sweep(config_spec)
    common_keys = {text.partition("=")[0] for text in common_overrides}
    for overrides in sweep:
        clash = sorted(common_keys & set(overrides))
        if clash:
            raise InputError(f"--config.{clash[0]} is given on the command line and also swept by "
                             f"sweep(); drop one of them")
    runs = []
    for name, overrides in zip(run_names(sweep), sweep):
        texts = list(common_overrides) + [f"{k}={format_value(v)}" for k, v in overrides.items()]
        runs.append({"name": name, "workdir": os.path.join(root, name), "swept": overrides,
                     "overrides": texts})
    return runs


def validate(config_spec: str, runs: Sequence[dict], num_devices: int, num_processes: int) -> None:
    """Build every run's RunConfig; the first invalid run stops the sweep before any launch."""
    for run in runs:
        try:
            run_config.load_run_config(config_spec, run["overrides"], num_devices, num_processes)
        except ValueError as e:
            raise ConfigError(f"sweep run {run['name']!r} is invalid (nothing was launched): "
                             f"{e}") from None


# ----------------------------------------------------------------------------- launching

def train_command(config_spec: str, run: Mapping[str, Any]) -> list[str]:
    """`vlm-jax train ...` for one run."""
    return (["vlm-jax", "train", "--config", config_spec, "--workdir", run["workdir"]]
            + [f"--config.{text}" for text in run["overrides"]])


def launch_command(launcher: str, config_spec: str, run: Mapping[str, Any],
                   launcher_args: Sequence[str]) -> list[str]:
    """The command that starts one run under `launcher` (what `print` shows for `local`)."""
    overrides = [f"--config.{text}" for text in run["overrides"]]
    if launcher in ("local", "print"):
        return train_command(config_spec, run)
    if launcher == "tpu":
        return (["bash", "launch/tpu_pod.sh", "--name", _job_name(run["name"]),
                 "--config", config_spec, "--workdir", run["workdir"], *launcher_args,
                 "--", *overrides])
    if launcher == "slurm":
        return (["bash", "launch/slurm_submit.sh", "--job-name", _job_name(run["name"]),
                 *launcher_args, "--", "--config", config_spec, "--workdir", run["workdir"],
                 *overrides])
    raise InputError(f"--launcher={launcher!r}; supported: {LAUNCHERS}")


def _job_name(name: str) -> str:
    """TPU VM / SLURM job names: lowercase letters, digits and dashes, at most 40 characters."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return ("vlm-" + slug[:27]).rstrip("-") + "-" + _digest(name)


def run_local(command: Sequence[str], log_path: str, cache_dir: str) -> int:
    """One `vlm-jax train` in a subprocess (this interpreter), output teed to `log_path`.
    The runs share a persistent compilation cache in `cache_dir` (unless JAX_COMPILATION_CACHE_DIR
    is set): programs that no swept value changes (init, eval) compile once per sweep."""
    argv = [sys.executable, "-m", "vlm_jax.cli", *command[1:]]
    env = {**os.environ}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env)
        for line in process.stdout:
            log.write(line)
            if not line.startswith("\r"):
                sys.stdout.write(line)
        return process.wait()


def launch(args: argparse.Namespace, overrides: list[str]) -> int:
    runs = expand(args.config, args.workdir, overrides)
    num_devices = args.num_devices
    if num_devices is None:
        num_devices = jax.device_count()
    validate(args.config, runs, num_devices, args.num_processes)
    for run in runs:
        run["command"] = launch_command(args.launcher, args.config, run, args.launcher_args)
        run["status"] = "pending"
    record = {"config": args.config, "launcher": args.launcher, "overrides": overrides,
              "validated_for": {"devices": num_devices, "processes": args.num_processes},
              "runs": runs}
    if args.launcher == "local" and "://" in args.workdir:
        raise InputError(f"--launcher local writes runs on this machine; --workdir "
                         f"{args.workdir} is remote (use --launcher tpu or slurm)")
    if args.launcher == "print":  # the record still lets --report read runs started by hand
        for run in runs:
            run["status"] = "printed"
            print(shlex.join(run["command"]))
        write_json(os.path.join(args.workdir, "sweep.json"), record)
        return 0
    write_json(os.path.join(args.workdir, "sweep.json"), record)
    failed = []
    for number, run in enumerate(runs, 1):
        print(f"vlm-jax sweep: run {number}/{len(runs)} {run['name']}: "
              f"{shlex.join(run['command'])}", flush=True)
        started = time.time()
        if args.launcher == "local":
            os.makedirs(run["workdir"], exist_ok=True)
            code = run_local(run["command"], os.path.join(run["workdir"], "train.log"),
                             os.path.join(args.workdir, "jax_cache"))
        else:
            code = subprocess.call(run["command"])
        run.update(returncode=code, seconds=round(time.time() - started, 1),
                   status=("submitted" if args.launcher == "slurm" else "done") if code == 0
                   else "failed")  # tpu_pod.sh returns when its run has ended
        if code:
            failed.append(run["name"])
        write_json(os.path.join(args.workdir, "sweep.json"), record)
    if failed:
        print(f"vlm-jax sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    print(f"vlm-jax sweep: {len(runs)} runs {runs[0]['status']}; table: "
          f"vlm-jax sweep --report --workdir {args.workdir}")
    return 0


def write_json(path: str, value: Any) -> None:
    """Write atomically on local disks; epath also reaches gs:// roots (tpu / slurm sweeps)."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(target)


# ----------------------------------------------------------------------------- report

def final_metrics(workdir: str) -> dict[str, Any] | None:
    """The last training row of `workdir/metrics.jsonl` merged with the last eval row
    (None when the run wrote no metrics)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    train_row, eval_row = None, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row:
            train_row = row
        if any(key.startswith("eval/") for key in row):
            eval_row = row
    if train_row is None:
        return None
    return {**{k: v for k, v in eval_row.items() if k != "step"}, **train_row}


def report(root: str) -> tuple[list[dict], str]:
    """(rows, markdown table) of every run in ROOT/sweep.json."""
    sweep_file = epath.Path(root) / "sweep.json"
    if not sweep_file.exists():
        raise InputError(f"--workdir: {sweep_file} does not exist (run `vlm-jax sweep` first)")
    record = json.loads(sweep_file.read_text())
    swept_keys = list(dict.fromkeys(k for run in record["runs"] for k in run["swept"]))
    rows = []
    for run in record["runs"]:
        metrics = final_metrics(run["workdir"]) or {}
        status = run.get("status", "unknown")
        if not metrics and status != "failed":
            status = "no metrics"
        row = {"name": run["name"], **{k: run["swept"].get(k) for k in swept_keys},
               "status": status, "step": metrics.get("step")}
        row.update({key: metrics.get(key) for key in REPORT_METRICS})
        rows.append(row)
    shown = [c for c in ["name", *swept_keys, "status", "step", *REPORT_METRICS]
             if any(row.get(c) is not None for row in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    return rows, "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
