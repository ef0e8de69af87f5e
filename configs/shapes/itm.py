"""Image-text matching on the shapes world, after the recipe: a matching phase from the recipe's
instruct model (the LLM reads image + caption, a head says whether they match), by default
`contrastive+itm` for 600 steps, trained on the positives, on hard negatives drawn from the
contrastive towers' similarities and on 2 one-change captions per training caption
(`--negatives`, data.negative_captions: without them the head stopped at 83.7-88.6% on
one-change captions, because a batch of random scenes holds almost no such near neighbours;
with 2 of them 89.8% at 300 steps and 96.9% at 600, README "Image-text matching"), then

  * matching accuracy on held-out test scenes, each with its true caption and a caption that
    differs in exactly one object's colour, shape or position (one table row per change), and
  * retrieval on held-out test scenes: R@1 / R@5 by SigLIP similarity, and with the ITM head
    re-ranking the 16 most similar (vlm_jax/eval/tasks.py `rerank`).

    python -m configs.shapes.run --workdir runs/shapes        # the recipe first
    python -m configs.shapes.itm --workdir runs/shapes        # then this (workdir/itm/)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from configs.shapes import config as recipe
from configs.shapes.run import done_before

CHANGES = ("color", "shape", "position")


def train_itm(workdir: str, steps: int = 0, batch: int = 0, world: str = "recipe",
              fusion: str = "early", objective: str = "itm", out: str = "itm",
              negatives: int = 0) -> float:
    """The matching phase (`objective`: itm, or contrastive+itm, which also trains the towers
    that choose the negatives; `negatives`: one-change captions per training caption, scored as
    extra negatives) from workdir/instruct/model into workdir/`out` (skipped when that holds
    this model already, refused when it holds another: `run.done_before`); returns wall
    seconds."""
    from vlm_jax.train.loop import train
    started = time.perf_counter()
    phase_dir = os.path.join(workdir, out)
    arg = (f"phase=itm,steps={steps},batch={batch},world={world},fusion={fusion},"
           f"negatives={negatives},tokenizer={os.path.join(workdir, 'tokenizer')},"
           f"init_from={os.path.join(workdir, 'instruct', 'model')}")
    config = recipe.get_config(arg)
    config.train.phase.name = objective
    if done_before(phase_dir, config):
        print(f"== {objective}: done before ({phase_dir}/model), evaluating it")
    else:
        metrics = train(config, phase_dir)
        if metrics["preempted"]:
            raise SystemExit("itm was preempted; run the command again to resume")
    return time.perf_counter() - started


def evaluate_itm(model_path: str, num_scenes: int, world: str = "recipe",
                 batch_size: int = 64) -> dict:
    """Matching accuracy per change type and retrieval with / without re-ranking."""
    from vlm_jax.data.images import preprocess_image
    from vlm_jax.data.sources.shapes import ShapesSource
    from vlm_jax.data.transforms import TokenizeContrastive
    from vlm_jax.eval import captions as caption_metrics
    from vlm_jax.eval import tasks
    from vlm_jax.model_dir import load_model

    config, params, tokenizer = load_model(model_path)
    source = ShapesSource("test", image_size=recipe.IMAGE_SIZE, task="caption",
                          num_examples=num_scenes, **recipe.WORLDS[world])
    tokenize = TokenizeContrastive(tokenizer, recipe.TEXT_LEN)
    rng = np.random.default_rng(0)
    scenes = [source.sample(i)[0] for i in range(num_scenes)]
    pixels = np.stack([preprocess_image(source.render(s), recipe.IMAGE_SIZE) for s in scenes])
    captions = [source.caption(s) for s in scenes]
    changed = {change: [source.changed_caption(s, change, rng) for s in scenes]
               for change in CHANGES}

    def tokens(texts):
        out = [tokenize.map({"caption": t, "images": []}) for t in texts]
        return (np.stack([o["text_ids"] for o in out]),
                np.array([o["text_lengths"] for o in out], np.int32))

    images = np.arange(num_scenes)
    accuracy = {}
    for change in CHANGES:  # texts: the true captions, then the changed ones
        ids, lengths = tokens(captions + changed[change])
        logits = tasks.itm_scores(config, params, pixels, ids, lengths,
                                  np.concatenate([images, images]),
                                  np.concatenate([images, images + num_scenes]), batch_size)
        labels = np.concatenate([np.ones(num_scenes), np.zeros(num_scenes)])
        accuracy[change] = float(np.mean((logits > 0) == (labels > 0.5)))
    accuracy["overall"] = float(np.mean([accuracy[c] for c in CHANGES]))

    ids, lengths = tokens(captions)
    image_embeddings, text_embeddings = tasks.contrastive_embeddings(config, params, pixels, ids,
                                                                     batch_size)
    similarity = image_embeddings @ text_embeddings.T
    same = np.array([[a == b for b in captions] for a in captions])
    score = functools.partial(tasks.itm_scores, config, params, pixels, ids, lengths,
                              batch_size=batch_size)
    retrieval = {
        "image -> text": caption_metrics.recall_at_k(similarity, same),
        "image -> text, ITM re-ranked": caption_metrics.recall_at_k(
            tasks.rerank(score, similarity, tasks.RERANK_CANDIDATES), same),
        "text -> image": caption_metrics.recall_at_k(similarity.T, same.T),
        "text -> image, ITM re-ranked": caption_metrics.recall_at_k(
            tasks.rerank(lambda t, i: score(i, t), similarity.T, tasks.RERANK_CANDIDATES),
            same.T),
    }
    lines = [f"== ITM accuracy, {num_scenes} held-out scenes x (true caption, caption with one "
             f"object changed)"]
    lines += [f"{change:<12}{100 * accuracy[change]:>7.1f}%" for change in CHANGES + ("overall",)]
    lines += ["", f"== retrieval among {num_scenes} held-out scenes", f"{'':<32}{'R@1':>8}{'R@5':>8}"]
    lines += [f"{name:<32}" + "".join(f"{100 * r[k]:>7.1f}%" for k in (1, 5))
              for name, r in retrieval.items()]
    return {"itm_accuracy": accuracy,
            "retrieval": {name: {str(k): v for k, v in r.items()} for name, r in retrieval.items()},
            "table": "\n".join(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.shapes.itm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/shapes",
                        help="the recipe's workdir (its tokenizer/ and instruct/model)")
    parser.add_argument("--steps", type=int, default=0, help="0 = the recipe's itm schedule")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=500, help="held-out test scenes")
    parser.add_argument("--world", default="recipe", choices=tuple(recipe.WORLDS))
    parser.add_argument("--fusion", default="early", choices=tuple(recipe.FUSIONS))
    parser.add_argument("--objective", default="contrastive+itm", choices=("itm", "contrastive+itm"),
                        help="contrastive+itm also trains the towers that choose the negatives")
    parser.add_argument("--negatives", type=int, default=2,
                        help="one-change captions per training caption, scored as extra "
                             "negatives beside the drawn ones (data.negative_captions)")
    parser.add_argument("--out", default="itm", help="directory under --workdir for this run")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "instruct", "model", "config.json")):
        print(f"{args.workdir}/instruct/model does not exist: run `python -m configs.shapes.run "
              f"--workdir {args.workdir}` first", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    seconds = {args.objective: train_itm(args.workdir, args.steps, args.batch, args.world,
                                         args.fusion, args.objective, args.out,
                                         args.negatives)}
    started = time.perf_counter()
    results = evaluate_itm(os.path.join(args.workdir, args.out, "model"), args.scenes, args.world)
    seconds["evaluate"] = time.perf_counter() - started
    print(results["table"])
    print("\n== wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    with open(os.path.join(args.workdir, args.out, "results.json"), "w") as f:
        json.dump({**{k: v for k, v in results.items() if k != "table"}, "seconds": seconds},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
