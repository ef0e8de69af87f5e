"""The `vlm-jax` command line: one module per subcommand, one registry, one error guard.

    vlm-jax [--debug] COMMAND [ARGS...]        (python -m vlm_jax.cli COMMAND ... is the same)

Each command module has `HELP` (one line) and `main(argv) -> exit code`. A user's mistake is a
`vlm_jax.errors` exception, printed here as one line naming the field, flag or file:

    exit 0    done (plan: fits)
    exit 1    plan: does not fit; sweep: a run failed
    exit 2    an error: config, data, checkpoint, conversion or input (flags, requests, images);
              an OS error (a file that cannot be read or written) is reported the same way
    exit 3    stopped on purpose: train (too many bad examples), export-hf (its self-check failed)
    exit 130  Ctrl-C

`--debug` (anywhere on the line) shows the traceback instead. Anything else that escapes is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import sys

from vlm_jax.cli import eval as eval_command
from vlm_jax.cli import export_hf, generate, import_hf, inspect_data, plan, score, sweep, train
from vlm_jax.errors import VlmJaxError

COMMANDS = {
    "train": train,
    "eval": eval_command,
    "generate": generate,
    "score": score,
    "import-hf": import_hf,
    "export-hf": export_hf,
    "inspect-data": inspect_data,
    "plan": plan,
    "sweep": sweep,
}


USAGE_NOTES = """\
`vlm-jax COMMAND --help` shows a command's options. A mistake in a config, the data, a
checkpoint, an HF directory or a flag is one line naming the field, file or flag; --debug
(anywhere on the line) shows the traceback instead.

exit codes: 0 done (plan: fits) | 1 plan: does not fit, sweep: a run failed | 2 an error |
3 stopped on purpose (train: too many bad examples; export-hf: self-check failed) | 130 Ctrl-C"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level `vlm-jax --help`: the commands and their one-line help."""
    parser = argparse.ArgumentParser(
        prog="vlm-jax", description="Train, evaluate and export vision-language models.",
        epilog=USAGE_NOTES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, add_help=False, help=module.HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"vlm-jax: error: unknown command {name!r}"
              + (f"; did you mean {close[0]}?" if close else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name].main(rest) or 0
    except (VlmJaxError, OSError) as e:
        if debug:
            raise
        print(f"vlm-jax {name}: {getattr(e, 'label', 'error')}: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vlm-jax {name}: interrupted by Ctrl-C", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split())
