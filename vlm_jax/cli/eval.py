"""`vlm-jax eval`: score a checkpoint on a config's evaluation data; results.json + report.html.
    vlm-jax eval --config configs/shapes/config.py:phase=instruct --checkpoint runs/shapes/instruct \\
        --split test --num-examples 200 --out runs/shapes/eval-test

The data is the config's `eval_data` (else its `data`); the checkpoint (a model directory or a
finished run's workdir) brings the model and its tokenizer. What is measured follows the data's
task (`--task` overrides):
    instruct     -> vqa        every assistant turn is one question. Its prompt is the conversation
                               up to that turn, earlier turns with their reference answers (as
                               training saw them). Exact match after the VQA answer normalisation;
                               box answers "[x0, y0, x1, y1]" (type `grounding`) count when IoU
                               >= 0.5. One row per question type (types from the source's
                               meta["question_types"], e.g. shapes; else "vqa" / "grounding").
    align        -> caption    the "plain" template's image prefix, greedy caption up to EOS;
                               BLEU-4 and CIDEr-D against the example's caption.
    contrastive  -> retrieval  SigLIP image and text embeddings; image->text and text->image
                               recall@1/5 (captions with identical text count as the same).

Examples are taken in order from the start of each source (`--num-examples` each, no shuffle),
so two runs see the same questions. Answers come from batched KV-cache greedy decoding
(`inference/batching.py`); the tasks are `vlm_jax/eval/tasks.py`. `--blank-baseline` (vqa) scores the model once more with every image
blanked, the share of accuracy the text alone explains.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax

from vlm_jax import model_dir
from vlm_jax.cli.common import add_dtype_arg, config_overrides
from vlm_jax.config import to_dict
from vlm_jax.errors import DataError, InputError
from vlm_jax.eval.report import write_report
from vlm_jax.eval.tasks import (SPLIT_SOURCES, TASK_OF_DATA, TASKS, check_model_fits, check_out,
                                evaluate_captions, evaluate_retrieval, evaluate_vqa, read_examples)
from vlm_jax.models.vlm import with_run_settings
from vlm_jax.train.run_config import load_run_config

HELP = "score a checkpoint: VQA, captioning, grounding, retrieval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-jax eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:arg] whose eval_data "
                                                        "(else data) is evaluated")
    parser.add_argument("--checkpoint", required=True,
                        help="model directory or finished run workdir")
    parser.add_argument("--out", default=None, help="output directory (default CHECKPOINT/eval-TASK); "
                        "an earlier eval's results there are replaced, other files refused")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="default from the data's task: " + str(TASK_OF_DATA))
    parser.add_argument("--split", default=None,
                        help=f"override `split` of every source ({', '.join(SPLIT_SOURCES)})")
    parser.add_argument("--num-examples", type=int, default=100, help="examples per source")
    parser.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: vqa 16 (32 with box answers), caption 48")
    parser.add_argument("--template", default=None, help="vqa chat template (default: the one "
                        "the model was trained with, else data.template)")
    parser.add_argument("--blank-baseline", action="store_true",
                        help="vqa: also score with every image blanked")
    parser.add_argument("--report-examples", type=int, default=64,
                        help="predictions shown in report.html")
    add_dtype_arg(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    return run(args, config_overrides(rest, parser))


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    for name in ("num_examples", "batch_size", "report_examples"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be >= 1")
    model_path = model_dir.resolve_model_dir(args.checkpoint, "--checkpoint")
    # A recipe that reads its model section from a model directory (model=DIR in its argument,
    # e.g. configs/llava15_siglip.py) and leaves it empty here: the checkpoint is that model.
    run_config = load_run_config(args.config, overrides, jax.device_count(), jax.process_count(),
                                 model=to_dict(model_dir.load_config(model_path)))
    data = run_config.eval_data or run_config.data
    task = args.task or TASK_OF_DATA.get(data.task)
    if task is None:
        raise InputError(f"data task {data.task!r} has no evaluation; vlm-jax eval scores "
                         f"{TASK_OF_DATA} (or pass --task)")
    out = args.out or os.path.join(args.checkpoint, f"eval-{task}")
    check_out(out)  # before the model loads: a refused --out costs nothing
    model_config, params, tokenizer = model_dir.load_model(model_path)
    model_config = with_run_settings(model_config, dtype=args.dtype)
    note = model_dir.compute_note(model_path, args.dtype)
    if note:
        print(note, file=sys.stderr)
    check_model_fits(task, model_config, tokenizer)
    # Prompts and images as the model was trained on them (a model directory records both).
    trained = model_dir.load_data_settings(model_path)
    pad_to_square = trained["pad_to_square"] or data.pad_to_square
    template = args.template or trained["template"] or data.template
    started = time.perf_counter()
    examples, skipped = read_examples(data, args.num_examples, args.split,
                                      model_config.vision.image_size, pad_to_square,
                                      trained["tiling"])
    if not examples:
        raise DataError(f"no usable examples in the evaluation data (skipped: {dict(skipped)})")
    if task == "vqa":
        result = evaluate_vqa(model_config, params, tokenizer, examples, args, template,
                              data.prefix_lm or trained["prefix_lm"])
    elif task == "caption":
        result = evaluate_captions(model_config, params, tokenizer, examples, args)
    else:
        result = evaluate_retrieval(model_config, params, tokenizer, examples, args, data.text_len)
    seconds = time.perf_counter() - started
    os.makedirs(out, exist_ok=True)
    summary = {"task": task, "checkpoint": os.path.abspath(model_path), "config": args.config,
               "overrides": list(overrides), "split": args.split, "num_examples": len(examples),
               "skipped": dict(skipped), "seconds": seconds, "metrics": result["metrics"],
               "table": result["table"], "predictions": result["predictions"]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_report(os.path.join(out, "report.html"), f"{task}: {args.checkpoint}",
                 {**result["metrics"], "examples": len(examples), "seconds": round(seconds, 1)},
                 result["table"], result["rows"][:args.report_examples])
    print(result["table"])
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in result["metrics"].items()))
    print(f"wrote {out}/results.json and {out}/report.html ({len(examples)} examples, "
          f"{seconds:.1f} s)")
    return 0
