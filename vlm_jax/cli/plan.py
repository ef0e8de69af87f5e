"""`vlm-jax plan`: compile a config's train step for a device mesh ahead of time and report
per-device memory and whether it fits (what the numbers mean: `vlm_jax/train/plan.py`).

Exit codes: 0 fits, 1 does not fit, 2 the config / mesh / arguments are invalid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import jax
from absl import flags

from vlm_jax.cli.common import config_overrides
from vlm_jax.errors import InputError
from vlm_jax.train.plan import DEVICES, format_report, make_plan, parse_mesh

HELP = "fit check: compile the train step for a device mesh, report memory"
CHILD_ENV = "VLM_JAX_PLAN_CHILD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-jax plan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Devices: " + ", ".join(f"{k} ({v.memory_gib:g} GiB)" for k, v in DEVICES.items())
        + ". Overrides --config.a.b=V apply as in `vlm-jax train`.")
    parser.add_argument("--config", required=True, help="config file and its argument")
    parser.add_argument("--mesh", required=True,
                        help="DATAxFSDP[xTENSOR], e.g. 16x16, or data=1,fsdp=64,tensor=1")
    parser.add_argument("--devices", required=True, choices=sorted(DEVICES),
                        help="the accelerator whose memory the plan is checked against")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory per device in GiB (default: the --devices table)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="processes (hosts) of the run: data.batch_size is per process "
                             "(default: devices / devices per host of --devices)")
    parser.add_argument("--headroom", type=float, default=0.9,
                        help="FITS only when the estimate is below this fraction of the memory")
    parser.add_argument("--top", type=int, default=8, help="largest tensors listed")
    parser.add_argument("--topology", default=None,
                        help="compile with the TPU compiler for this slice instead of on fake CPU "
                             "devices, e.g. v5p:2x4x4 (32 chips); needs libtpu importable, no TPU")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    return parser


def ensure_cpu_devices(count: int) -> bool:
    """Make jax start with `count` CPU devices. False when jax already runs with another count
    (the caller re-runs the command in a fresh process)."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: the settings can no longer change
        pass
    return jax.default_backend() == "cpu" and jax.device_count() == count


def rerun_in_fresh_process(argv: list[str], count: int) -> int:
    if os.environ.get(CHILD_ENV):
        raise RuntimeError(f"could not start jax with {count} CPU devices")
    env = {**os.environ, CHILD_ENV: "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(count)}
    return subprocess.call([sys.executable, "-m", "vlm_jax.cli", "plan", *argv], env=env)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(rest, parser)
    mesh_sizes = parse_mesh(args.mesh)
    device = DEVICES[args.devices]
    memory_gib = args.memory_gib if args.memory_gib is not None else device.memory_gib
    num_devices = math.prod(mesh_sizes.values())
    num_processes = args.num_processes or max(1, num_devices // device.per_host)
    if num_devices % num_processes:
        raise InputError(f"--num-processes={num_processes} does not divide the "
                         f"{num_devices} devices of the mesh")
    if not 0 < args.headroom <= 1:
        raise InputError(f"--headroom={args.headroom} must be in (0, 1]")
    if args.topology and not args.devices.startswith("tpu_"):
        raise InputError(f"--topology is a TPU slice; --devices {args.devices} is not a TPU")
    if args.json_path and os.path.exists(args.json_path) and not _is_plan_report(args.json_path):
        raise InputError(f"--json {args.json_path} exists and is not an earlier plan report; "
                         f"choose another path")
    if args.topology:
        ensure_cpu_devices(1)  # the host side only: libtpu compiles, no TPU is opened
    elif not ensure_cpu_devices(num_devices):
        return rerun_in_fresh_process(argv, num_devices)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    report = make_plan(args.config, overrides, mesh_sizes, args.devices, memory_gib,
                       num_processes, args.headroom, args.top, args.topology)
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


def _is_plan_report(path: str) -> bool:
    """Whether `path` holds a report an earlier `vlm-jax plan --json` wrote (then it is replaced)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"fits", "mesh"} <= set(report)
