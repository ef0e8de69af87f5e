"""`vlm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...] --workdir DIR`.

Re-running the same command resumes from the workdir's latest checkpoint. Ctrl-C saves a
checkpoint at the next step and exits with 130 (a second Ctrl-C exits at once, also 130);
SIGTERM (preemption) saves the same way and exits with 0."""
from __future__ import annotations

import argparse
import json
import sys

import jax
from absl import flags

from vlm_jax import distributed
from vlm_jax.cli.common import config_overrides
from vlm_jax.train import loop
from vlm_jax.train.run_config import load_run_config

HELP = "train per a config file; re-run to resume"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-jax train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config file and its argument, e.g. configs/tiny.py:phase=align")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the final model")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config as JSON and exit (nothing compiles)")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="resume a checkpoint written under other train.steps / epochs / "
                             "train.optimizer schedule values (refused without this flag): go on "
                             "from its step under the config's values, the lr jumping to the new "
                             "schedule's value there")
    group = parser.add_argument_group(
        "multi-process", "one process per host; without these flags a TPU VM slice or a SLURM "
        "step is detected by itself, anything else runs as one process (vlm_jax/distributed.py)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0, e.g. 10.0.0.2:8476")
    group.add_argument("--num-processes", type=int, help="number of processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(rest, parser)
    try:
        # Before anything touches a JAX backend: the processes join here.
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags
            flags.FLAGS.mark_as_parsed()
        run = load_run_config(args.config, overrides, jax.device_count(), jax.process_count())
        if args.print_config:
            print(json.dumps(run.to_dict(), indent=2))
            return 0
        metrics = loop.train(run, args.workdir, allow_schedule_change=args.allow_schedule_change)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run could save
        print(f"vlm-jax train: interrupted by Ctrl-C, nothing saved after the last checkpoint; "
              f"re-run the same command to resume from the latest one in {args.workdir}",
              file=sys.stderr)
        return 130
    by_ctrl_c = metrics.get("stopped_by") == "Ctrl-C"
    if jax.process_index() != 0:  # process 0 reports for the run
        return 130 if by_ctrl_c else 0
    if by_ctrl_c:
        print(f"vlm-jax train: stopped by Ctrl-C at step {metrics['step']}; checkpoint "
              f"{metrics['checkpoint']}; re-run the same command to resume", file=sys.stderr)
        return 130
    shown = {k: v for k, v in metrics.items() if not k.startswith("data/")}
    print("vlm-jax train: " + ("preempted" if metrics["preempted"] else "done") + " "
          + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in shown.items()))
    return 0
