"""`vlm-jax inspect-data`: show examples as the model sees them (terminal + an HTML contact sheet).

With `--config FILE[:ARG]` (and `--config.a.b=V` overrides) it shows exactly what `vlm-jax train`
with that config feeds the model: the validated run config, the trainer's tokenizer
(`train.tokenizer.build_tokenizer`) and the trainer's first batch. Without a config, direct flags
(`--source shapes|llava_json`, `--path`, `--template`, ...) describe one source. The HTML file
is written only where nothing else is: an existing file is replaced only when an earlier
inspect-data wrote it, or with --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Sequence

import jax

from vlm_jax.cli.common import config_overrides
from vlm_jax.config import from_dict
from vlm_jax.data import pipeline
from vlm_jax.data.inspect import (HTML_GENERATOR, Inspection, inspect_examples, print_inspection,
                                  write_html)
from vlm_jax.data.skips import TooManySkippedExamples
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import DataError, InputError
from vlm_jax.models.vlm import VLMConfig
from vlm_jax.train.tokenizer import build_tokenizer
from vlm_jax.train.run_config import RunConfig, TokenizerConfig, TrainConfig, load_run_config

HELP = "show examples as the model sees them"
DIRECT_SHAPES_EXAMPLES = 1000  # --source shapes reads at most this many training scenes

# Direct flags -> how a config says the same; refused with --config, where the config (and its
# --config.a.b=V overrides) is what training reads.
_SOURCES = "--config.data.sources='[...]'"
DIRECT_FLAGS = {"source": _SOURCES, "path": _SOURCES, "image_root": _SOURCES,
                "task": "--config.data.task=TASK", "template": "--config.data.template=NAME",
                "tokenizer": "--config.tokenizer.kind=path --config.tokenizer.path=PATH",
                "seq_len": "--config.data.seq_len=N",
                "image_size": "--config.model.vision.image_size=N (data.image_size follows it)",
                "num_image_tokens": "the model's projector (data.num_image_tokens is set from it)"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, with `overrides` the --config.a.b=V list (parsed as `vlm-jax train` does)."""
    parser = argparse.ArgumentParser(prog="vlm-jax inspect-data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config FILE[:ARG] as for `vlm-jax train`, with "
                        "--config.a.b=VALUE overrides")
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="with --config: the config's data (train) or eval_data (eval)")
    parser.add_argument("--workdir", help="with --config: a run's workdir whose saved shapes "
                        "tokenizer (WORKDIR/tokenizer) is reused instead of fitting one")
    parser.add_argument("--source", choices=("shapes", "llava_json"),
                        help="direct mode: the source kind (instead of --config)")
    parser.add_argument("--path", help="llava_json: the JSON / JSONL file")
    parser.add_argument("--image-root", help="llava_json: image root (default: the JSON's folder)")
    parser.add_argument("--task", choices=pipeline.TASKS, help="direct mode (default instruct)")
    parser.add_argument("--template", help="direct mode: chat template (default vicuna)")
    parser.add_argument("--tokenizer", help="direct mode: tokenizer.json / .model / directory "
                        "(shapes: default is the tokenizer a tokenizer.kind='shapes' run fits)")
    parser.add_argument("--seq-len", type=int, help="direct mode (default 512)")
    parser.add_argument("--image-size", type=int, help="direct mode (default 224)")
    parser.add_argument("--num-image-tokens", type=int, help="direct mode (default 196)")
    parser.add_argument("--num-examples", "-n", type=int, default=4,
                        help="examples shown in source order")
    parser.add_argument("--rows", type=int, default=2, help="rows of the first batch shown in full")
    parser.add_argument("--out", default="inspect_data.html", help="HTML contact sheet path (an "
                        "existing file is replaced only if inspect-data wrote it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when inspect-data did not write it")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args, rest = parser.parse_known_args(argv)
    args.overrides = config_overrides(rest, parser)
    if args.overrides and not args.config:
        parser.error("--config.a.b=VALUE overrides need --config")
    return args


def run_data(args: argparse.Namespace, scratch: str) -> tuple[pipeline.DataConfig, Tokenizer]:
    """The data config and tokenizer `vlm-jax train --config ...` builds (fitting a shapes
    tokenizer into `scratch` unless --workdir has one)."""
    for name, hint in DIRECT_FLAGS.items():
        if getattr(args, name) is not None:
            raise InputError(f"--{name.replace('_', '-')} is a direct-mode flag; with --config "
                             f"the config decides what training reads: {hint}")
    run = load_run_config(args.config, args.overrides, jax.device_count(), jax.process_count())
    data = run.data if args.split == "train" else run.eval_data
    if data is None:
        raise InputError(f"--split eval: {args.config} has no eval_data section")
    workdir = scratch
    if args.workdir:
        if run.tokenizer.kind != "shapes":
            raise InputError(f"--workdir: only a tokenizer.kind='shapes' run saves its tokenizer "
                             f"there; this config reads tokenizer.path={run.tokenizer.path}")
        if not os.path.isdir(os.path.join(args.workdir, "tokenizer")):
            raise InputError(f"--workdir {args.workdir} has no tokenizer/ (a run saves it when it "
                             f"starts); leave --workdir out to fit the one a new run would")
        workdir = args.workdir
    # Grain worker processes change where examples are decoded, not which ones or in what order;
    # reading in this process needs no process pool (and no absl flags).
    return dataclasses.replace(data, worker_count=0), build_tokenizer(run, workdir)


def direct_data(args: argparse.Namespace, scratch: str) -> tuple[pipeline.DataConfig, Tokenizer]:
    """A DataConfig from the direct flags, and the tokenizer `build_tokenizer`
    gives for --tokenizer (tokenizer.kind='path') or, for shapes, tokenizer.kind='shapes'."""
    if args.workdir or args.split != "train":
        raise InputError("--workdir and --split need --config (they name parts of a run)")
    task = args.task or "instruct"
    if args.source == "shapes":
        values = {"sources": [{"kind": "shapes", "options": {
            "task": {"align": "caption", "contrastive": "caption", "lm": "text"}.get(task, "qa"),
            "image_size": args.image_size or 224,
            # Bounded: with every example skipped (a seq_len too short) the first batch search
            # ends here instead of walking the whole split.
            "num_examples": DIRECT_SHAPES_EXAMPLES}}]}
    elif args.source == "llava_json":
        if not args.path:
            raise InputError("--source llava_json needs --path")
        values = {"sources": [{"kind": "llava_json",
                               "options": {"path": args.path, "image_root": args.image_root}}]}
    else:
        raise InputError("give --config FILE[:ARG] or --source shapes|llava_json")
    flags = {"task": task, "template": args.template, "seq_len": args.seq_len,
             "image_size": args.image_size, "num_image_tokens": args.num_image_tokens}
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(shuffle=False, num_epochs=1, worker_count=0, read_threads=0,
                  max_skip_fraction=1.0)
    cfg = from_dict(pipeline.DataConfig, values, "data")
    if args.tokenizer:
        tokenizer_cfg = TokenizerConfig(kind="path", path=args.tokenizer)
    elif all(s.kind == "shapes" for s in cfg.sources):
        tokenizer_cfg = TokenizerConfig(kind="shapes")
    else:
        raise InputError("--tokenizer is required unless every source is shapes")
    # No model here: build_tokenizer then reads the tokenizer section alone (no vocabulary or
    # image-token check against a model).
    run = RunConfig(model=VLMConfig(), data=cfg, train=TrainConfig(), tokenizer=tokenizer_cfg)
    return cfg, build_tokenizer(run, scratch)


def collect(args: argparse.Namespace) -> Inspection:
    """What inspect-data shows for `args` (see `parse_args`)."""
    with tempfile.TemporaryDirectory(prefix="vlm_jax_inspect_") as scratch:
        cfg, tokenizer = run_data(args, scratch) if args.config else direct_data(args, scratch)
    examples = inspect_examples(cfg, tokenizer, args.num_examples)
    batches = pipeline.build_pipeline(cfg, tokenizer)  # the trainer's call
    try:
        batch, stopped = next(batches, None), None
    except TooManySkippedExamples as e:
        batch, stopped = None, str(e)
    return Inspection(cfg, tokenizer, examples, batch, batches.skip_counts(), stopped)


def check_out(path: str, overwrite: bool) -> None:
    """--out may be new, or a page an earlier inspect-data wrote (it carries HTML_GENERATOR);
    anything else is kept unless --overwrite."""
    if os.path.isdir(path):
        raise InputError(f"--out {path} is a directory; give the HTML file's path")
    if os.path.exists(path) and not overwrite:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                ours = HTML_GENERATOR in f.read(4096)
        except OSError as e:
            raise InputError(f"--out {path}: {e.strerror or e}") from None
        if not ours:
            raise InputError(f"--out {path} exists and inspect-data did not write it; choose "
                             f"another --out or pass --overwrite")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    check_out(args.out, args.overwrite)  # before any data is read
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    inspection = collect(args)
    print_inspection(inspection, args.rows, color)
    write_html(args.out, inspection, args.rows)
    print(f"wrote {args.out}")
    if inspection.stopped:
        raise DataError(f"the trainer stops on its first batch: "
                        f"{' '.join(inspection.stopped.split())}")
    return 0
