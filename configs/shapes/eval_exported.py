"""The shapes recipe's held-out evaluation, answered by an **exported** model through transformers
alone (AutoProcessor, its chat template, `generate`), next to vlm-jax's answers to the same
questions (computed as `configs.shapes.run` evaluates):

    bash launch/local.sh                         # trains the recipe into runs/shapes
    vlm-jax export-hf --checkpoint runs/shapes/instruct/model --out exported/shapes
    python -m configs.shapes.eval_exported --model runs/shapes/instruct/model --exported exported/shapes

vlm_jax draws the questions (the recipe's test split, `--eval-per-type` per type), answers them
with the model directory (as the recipe's evaluation does) and scores both sides
(`eval.vqa.accuracy_by_type`); the exported model runs in PyTorch. Prints, per question type,
both accuracies and how many answers differ.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from configs.shapes import config as recipe
from configs.shapes.run import CORE_TYPES


def transformers_answers(exported: str, items, max_new_tokens: int) -> list[str]:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(exported, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(exported, trust_remote_code=True)
    answers = []
    for item in items:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": item.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=Image.fromarray(item.image), return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answers.append(processor.decode(generated[0, inputs["input_ids"].shape[1]:],
                                        skip_special_tokens=True).strip())
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exported", required=True, help="an export-hf directory of the recipe's model")
    parser.add_argument("--model", default="runs/shapes/instruct/model",
                        help="the vlm-jax model directory that was exported")
    parser.add_argument("--eval-per-type", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the table and answers as JSON here")
    args = parser.parse_args(argv)
    from vlm_jax.eval import vqa
    from vlm_jax.model_dir import load_model

    items = vqa.shapes_vqa_items("test", args.eval_per_type, recipe.IMAGE_SIZE,
                                 recipe.QUESTION_TYPES, world=recipe.WORLDS["recipe"])
    config, params, tokenizer = load_model(args.model)
    our_answers = [a.strip() for a in vqa.predict_answers(config, params, tokenizer, items, "minimal")]
    ours = vqa.accuracy_by_type(items, our_answers)
    started = time.perf_counter()
    # The recipe's evaluation asks with vlm-jax's default budget (eval.vqa.predict_answers).
    budget = 24 if any(i.question_type == vqa.GROUNDING for i in items) else 6
    answers = transformers_answers(args.exported, items, budget)
    seconds = time.perf_counter() - started
    theirs = vqa.accuracy_by_type(items, answers)
    differ = {}
    for item, a, b in zip(items, our_answers, answers):
        differ[item.question_type] = differ.get(item.question_type, 0) + (a != b)
    print(f"== exact-match accuracy, {args.eval_per_type} held-out test questions per type "
          f"(transformers: {seconds:.0f} s)")
    print(f"{'question type':<14}{'vlm-jax':>10}{'transformers':>14}{'answers differ':>16}")
    for qtype in theirs:
        (a, n), (b, m) = ours[qtype], theirs[qtype]
        print(f"{qtype:<14}{a / n:>10.1%}{b / m:>14.1%}{differ[qtype]:>16}")
    core = [t for t in CORE_TYPES if t in theirs]
    print(f"{'mean (core)':<14}{vqa.mean_accuracy(ours, core):>10.1%}"
          f"{vqa.mean_accuracy(theirs, core):>14.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"vlm_jax": ours, "transformers": theirs, "differ": differ,
                       "answers": {"vlm_jax": our_answers, "transformers": answers},
                       "seconds": seconds}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
