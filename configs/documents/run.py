"""The documents recipe: fit the tokenizer, train the same tiny VLM with tiles and without (same
encoder resolution, same steps), evaluate both on held-out test pages (layouts no training page
has), per question type, against the majority answer.

    python -m configs.documents.run --workdir runs/documents

Workdir: tokenizer/, tiles/ and no_tiles/ (each a `vlm-jax train` workdir ending in model/),
results.json. A variant whose model/ exists is skipped; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from configs.documents import config as recipe

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
VARIANTS = {"tiles": True, "no_tiles": False}


def fit_tokenizer(workdir: str) -> str:
    """The recipe's word-level tokenizer (every word and number of the world as one token, the
    tiling layout tokens reserved), saved in workdir/tokenizer; -> its directory."""
    from vlm_jax.data.sources import documents
    from vlm_jax.data.tiling import TilingConfig
    from vlm_jax.data.tokenizer import train_word_tokenizer

    out = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    source = documents.DocumentsSource(image_size=recipe.PAGE_SIZE, font_size=recipe.FONT_SIZE)
    texts = [" ".join(documents.vocabulary())]
    for index in range(2000):
        _, turns = source.sample(index)
        texts.append(" ".join(f"{q} {a}" for _, q, a in turns))
    tokenizer = train_word_tokenizer(
        texts, special_tokens=TilingConfig(recipe.MAX_TILES).layout_tokens(),
        vocab_size=recipe.VOCAB_SIZE)
    tokenizer.save(out)
    return out


def train_variants(workdir: str, steps: int, batch: int, log=print) -> dict[str, float]:
    from vlm_jax.train.loop import train

    seconds = {}
    started = time.perf_counter()
    tokenizer = fit_tokenizer(workdir)
    seconds["tokenizer"] = time.perf_counter() - started
    for name, tiles in VARIANTS.items():
        started = time.perf_counter()
        variant_dir = os.path.join(workdir, name)
        if os.path.exists(os.path.join(variant_dir, "model", "config.json")):
            log(f"== {name}: done before ({variant_dir}/model), skipped")
        else:
            log(f"== {name}")
            arg = f"tiles={tiles},steps={steps},batch={batch},tokenizer={tokenizer}"
            metrics = train(recipe.get_config(arg), variant_dir)
            if metrics["preempted"]:
                raise SystemExit(f"{name} was preempted; run the command again to resume")
        seconds[name] = time.perf_counter() - started
    return seconds


def test_items(num_per_type: int):
    """`num_per_type` single-question items per type from held-out test pages."""
    from vlm_jax.data.sources import documents
    from vlm_jax.eval.vqa import VQAItem

    items = []
    for question_type in recipe.QUESTION_TYPES:
        source = documents.DocumentsSource(split="test", image_size=recipe.PAGE_SIZE,
                                           font_size=recipe.FONT_SIZE, turns_per_example=1,
                                           question_types=(question_type,))
        for index in range(num_per_type):
            page, [(_, question, answer)] = source.sample(index)
            items.append(VQAItem(source.render(page), question, answer, question_type,
                                 f"documents:test:{index}:{question_type}"))
    return items


def evaluate(workdir: str, num_per_type: int) -> dict:
    from vlm_jax import model_dir
    from vlm_jax.data.sources import documents
    from vlm_jax.eval import vqa

    items = test_items(num_per_type)
    train_source = documents.DocumentsSource(image_size=recipe.PAGE_SIZE, turns_per_example=1)
    train_items = []
    for index in range(2000):
        _, [(kind, question, answer)] = train_source.sample(index)
        train_items.append(vqa.VQAItem(None, question, answer, kind, str(index)))
    majority = vqa.majority_baseline(train_items)
    columns = {}
    for name in VARIANTS:
        path = os.path.join(workdir, name, "model")
        config, params, tokenizer = model_dir.load_model(path)
        tiling = model_dir.load_data_settings(path)["tiling"]
        predictions = vqa.predict_answers(config, params, tokenizer, items, "minimal",
                                          max_new_tokens=24, tiling_config=tiling)
        columns[name.replace("_", " ")] = vqa.accuracy_by_type(items, predictions)
    columns["majority"] = vqa.accuracy_by_type(items, vqa.majority_predictions(items, majority))
    return {"columns": columns, "table": vqa.format_table(columns, recipe.QUESTION_TYPES),
            "overall": {name: vqa.mean_accuracy(table) for name, table in columns.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.documents.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/documents")
    parser.add_argument("--steps", type=int, default=0, help="0 = the recipe's own")
    parser.add_argument("--batch", type=int, default=0, help="0 = the recipe's own")
    parser.add_argument("--eval-per-type", type=int, default=200,
                        help="held-out test questions per question type")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()

    started = time.perf_counter()
    seconds = train_variants(args.workdir, args.steps, args.batch)
    eval_started = time.perf_counter()
    results = evaluate(args.workdir, args.eval_per_type)
    seconds["evaluate"] = time.perf_counter() - eval_started
    seconds["total"] = time.perf_counter() - started
    print(f"\n== accuracy on {args.eval_per_type} held-out test questions per type "
          f"(grounding: box IoU >= 0.5)")
    print(results["table"])
    print("\n== wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"seconds": seconds, **{k: v for k, v in results.items() if k != "table"}},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
