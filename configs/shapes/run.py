"""The shapes recipe end to end: fit the tokenizer, train the four phases in order (each starting
from the previous phase's model), then evaluate on held-out test scenes against two baselines.

    python -m configs.shapes.run --workdir runs/shapes          # what `bash launch/local.sh` runs

Layout of the workdir: tokenizer/ (shared by all phases), one `vlm-jax train` workdir per phase
(contrastive/ lm/ align/ instruct/, each ending in a model/ directory), results.json. A phase
whose model/ exists is skipped, and an interrupted phase resumes from its checkpoint, so running
the command again continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from configs.shapes import config as recipe

CORE_TYPES = ("color", "shape", "count", "exists", "position")
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


def fit_tokenizer(workdir: str, world: str = "recipe", fusion: str = "early"):
    """The recipe's tokenizer, fitted once into `workdir/tokenizer` and shared by every phase:
    the trainer's own fit (`build_tokenizer`, tokenizer.kind="shapes") under the instruct
    phase's config (3000 training scenes of the world, Q/A in the `minimal` template), checked
    against the recipe's model (vocabulary size, <image> id)."""
    import jax

    from vlm_jax.train.tokenizer import build_tokenizer
    from vlm_jax.train.run_config import load_run_config
    run = load_run_config(f"{CONFIG_FILE}:phase=instruct,world={world},fusion={fusion}", [],
                          jax.device_count())
    return build_tokenizer(run, workdir)


# Settings that change how a phase computes, not what it trains (and that follow the machine).
_HOW_NOT_WHAT = ("log.", "checkpoint.", "eval.", "mesh.", "train.micro_batches", "model.scan_unroll",
                 "data.read_threads", "data.prefetch_buffer_size", "data.worker_")


def done_before(phase_dir: str, config) -> bool:
    """Whether `phase_dir` already holds the model this command would train from `config`:
    False when it has none; True when its saved run config (phase_dir/config.json) agrees with
    `config` on every setting it records; else SystemExit naming the settings that differ (a
    rerun with other flags must not evaluate the old model as if it were the new one)."""
    import jax

    from vlm_jax.train.run_config import build_run_config
    if not os.path.exists(os.path.join(phase_dir, "model", "config.json")):
        return False
    with open(os.path.join(phase_dir, "config.json")) as f:
        saved = _flat(json.load(f))
    wanted = _flat(json.loads(json.dumps(
        build_run_config(config, jax.device_count(), jax.process_count()).to_dict())))
    differing = [k for k in sorted(saved) if not k.startswith(_HOW_NOT_WHAT)
                 and k in wanted and saved[k] != wanted[k]]  # a field it predates is not compared
    if differing:
        shown = "; ".join(f"{k}: there {saved[k]!r}, asked {wanted[k]!r}" for k in differing[:4])
        raise SystemExit(f"{phase_dir} holds a model trained with other settings ({shown}"
                         f"{' ...' if len(differing) > 4 else ''}): use another --workdir / --out, "
                         f"or remove {phase_dir} to train it again")
    return True


def _flat(value, prefix: str = "") -> dict:
    """{"data": {"sources": [{"kind": ...}]}} -> {"data.sources[0].kind": ...}."""
    if isinstance(value, dict):
        items = [(f"{prefix}.{k}" if prefix else k, v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    return {key: leaf for name, v in items for key, leaf in _flat(v, name).items()}


def train_phases(workdir: str, steps: int = 0, batch: int = 0, log=print,
                 style: str = "scene", world: str = "recipe",
                 fusion: str = "early") -> dict[str, float]:
    """Run the four phases (skipping finished ones); returns wall seconds per phase.
    steps / batch: 0 = the recipe's own per-phase values (config.SCHEDULE). style: the world's
    rendering ("codes" = the diagnostic flat codes per cell, see shapes.render_codes). world: a
    key of config.WORLDS. fusion: a key of config.FUSIONS."""
    from vlm_jax.train.loop import train

    tokenizer_dir = os.path.join(workdir, "tokenizer")
    seconds = {}
    started = time.perf_counter()
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        fit_tokenizer(workdir, world=world, fusion=fusion)
    seconds["tokenizer"] = time.perf_counter() - started
    previous = ""
    for phase in recipe.PHASES:
        phase_dir = os.path.join(workdir, phase)
        started = time.perf_counter()
        arg = (f"phase={phase},steps={steps},batch={batch},tokenizer={tokenizer_dir},"
               f"style={style},world={world},fusion={fusion}")
        if previous:
            arg += f",init_from={previous}"
        config = recipe.get_config(arg)
        if done_before(phase_dir, config):
            log(f"== {phase}: done before ({phase_dir}/model), skipped")
        else:
            log(f"== {phase}")
            metrics = train(config, phase_dir)
            if metrics["preempted"]:
                raise SystemExit(f"{phase} was preempted; run the command again to resume")
        seconds[phase] = time.perf_counter() - started
        previous = os.path.join(phase_dir, "model")
    return seconds


def evaluate_model(model_path: str, num_per_type: int, image_size: int = recipe.IMAGE_SIZE,
                   num_samples: int = 3, style: str = "scene", world: str = "recipe") -> dict:
    """Per-type accuracy of the model, the blank-image model and the majority answer on
    `num_per_type` held-out test questions per type, plus a few sample conversations."""
    from vlm_jax.eval import vqa as evaluate
    from vlm_jax.model_dir import load_model

    config, params, tokenizer = load_model(model_path)
    items = evaluate.shapes_vqa_items("test", num_per_type, image_size, recipe.QUESTION_TYPES,
                                      style=style, world=recipe.WORLDS[world])
    train_items = evaluate.shapes_vqa_items("train", 500, 8, recipe.QUESTION_TYPES,
                                            world=recipe.WORLDS[world])
    majority = evaluate.majority_baseline(train_items)
    predictions = evaluate.predict_answers(config, params, tokenizer, items, "minimal")
    blank = evaluate.predict_answers(config, params, tokenizer, items, "minimal",
                                     blank_images=True)
    columns = {"model": evaluate.accuracy_by_type(items, predictions),
               "blank image": evaluate.accuracy_by_type(items, blank),
               "majority": evaluate.accuracy_by_type(
                   items, evaluate.majority_predictions(items, majority))}
    # Sample conversations: every question the test set asks about the same few scenes.
    samples = []
    for scene in range(min(num_samples, num_per_type)):
        turns = [(items[k].question, predictions[k], items[k].answer)
                 for k in range(scene, len(items), num_per_type)
                 if np.array_equal(items[k].image, items[scene].image)]
        samples.append({"image": items[scene].example_id.rsplit(":", 1)[0], "turns": turns})
    return {"columns": columns, "samples": samples, "majority_answers": majority,
            "table": evaluate.format_table(columns, CORE_TYPES),
            "overall_core": {name: evaluate.mean_accuracy(table, CORE_TYPES)
                             for name, table in columns.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.shapes.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/shapes")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps of every phase (0 = the recipe's own, per phase)")
    parser.add_argument("--batch", type=int, default=0,
                        help="batch of every phase (0 = the recipe's own, per phase)")
    parser.add_argument("--eval-per-type", type=int, default=200,
                        help="held-out test questions per question type")
    parser.add_argument("--style", default="scene", choices=("scene", "codes"),
                        help="'codes': a diagnostic world whose images show each object's "
                             "attributes as flat codes (what the LLM learns from perfect vision)")
    parser.add_argument("--world", default="recipe", choices=tuple(recipe.WORLDS),
                        help="'recipe': 3 shapes, 4 colours, one size (the default); 'full': "
                             "the whole shapes world (4 shapes, 5 colours, 2 sizes)")
    parser.add_argument("--fusion", default="early", choices=tuple(recipe.FUSIONS),
                        help="'early': image tokens in the text (the default); 'cross_attention': "
                             "gated cross-attention blocks in the LLM")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()

    started = time.perf_counter()
    seconds = train_phases(args.workdir, args.steps, args.batch, style=args.style,
                           world=args.world, fusion=args.fusion)
    eval_started = time.perf_counter()
    results = evaluate_model(os.path.join(args.workdir, "instruct", "model"), args.eval_per_type,
                             style=args.style, world=args.world)
    seconds["evaluate"] = time.perf_counter() - eval_started
    seconds["total"] = time.perf_counter() - started

    from vlm_jax.eval.vqa import is_correct
    print("\n== sample conversations (held-out test scenes)")
    for sample in results["samples"]:
        print(f"[{sample['image']}]")
        for question, answer, reference in sample["turns"]:
            mark = "ok" if is_correct(answer, reference) else f"expected {reference!r}"
            print(f"  Q: {question}\n  A: {answer}    ({mark})")
    print(f"\n== exact-match accuracy, {args.eval_per_type} held-out test questions per type")
    print(results["table"])
    print("\n== wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"seconds": seconds, "overall_core": results["overall_core"],
                   "columns": results["columns"], "samples": results["samples"]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
