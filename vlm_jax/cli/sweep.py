"""`vlm-jax sweep`: expand a config's sweep() into runs, validate all, launch them, report
(the sweep itself: `vlm_jax/sweep.py`)."""
from __future__ import annotations

import argparse
import os
import shlex

from etils import epath

from vlm_jax.cli.common import config_overrides
from vlm_jax.sweep import LAUNCHERS, launch, report, write_json

HELP = "expand a config's sweep() into runs, launch them, report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-jax sweep", description=__doc__,
        epilog="Overrides --config.a.b=V apply to every run.")
    parser.add_argument("--config", help="config file with a sweep(), and its argument")
    parser.add_argument("--workdir", required=True, help="sweep root: one workdir per run below it")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--report", action="store_true",
                        help="print and write the table of each run's final metrics")
    parser.add_argument("--num-devices", type=int, default=None,
                        help="devices the runs are validated for (default: this machine's)")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes the runs are validated for (per-process batch sizes)")
    parser.add_argument("--launcher-args", type=shlex.split, default=[],
                        help="extra arguments for launch/tpu_pod.sh or launch/slurm_submit.sh, one "
                             "string, e.g. "
                             "\"--zone us-east5-a --accelerator-type v5p-64\"")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(rest, parser)
    if args.report:
        rows, table = report(args.workdir)
        print(table)
        (epath.Path(args.workdir) / "report.md").write_text(table + "\n")
        write_json(os.path.join(args.workdir, "report.json"), rows)
        return 0
    if not args.config:
        parser.error("--config is required (unless --report)")
    return launch(args, overrides)
