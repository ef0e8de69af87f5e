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
(`vlm_jax.generate`). `--blank-baseline` (vqa) scores the model once more with every image
blanked, the share of accuracy the text alone explains.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

TASK_OF_DATA = {"instruct": "vqa", "align": "caption", "contrastive": "retrieval"}
TASKS = ("vqa", "caption", "retrieval")
SPLIT_SOURCES = ("shapes", "tfds")  # source kinds whose options take a `split`


@dataclasses.dataclass
class Example:
    """One raw example, decoded: images u8[H, W, 3] (for the report) and model inputs."""
    id: str
    images: list[np.ndarray]
    pixels: np.ndarray          # f32[M, S, S, 3], SigLIP-normalised
    raw: dict


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
    from vlm_jax.cli import add_dtype_arg
    add_dtype_arg(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    from vlm_jax.cli import _config_overrides
    overrides = _config_overrides(rest, parser)
    try:
        return run(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm-jax eval: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    import jax

    from vlm_jax import config as config_lib
    from vlm_jax.checkpoint import resolve_model_dir
    from vlm_jax.config_utils import to_dict
    from vlm_jax.model_dir import compute_note, load_config, load_data_settings, load_model
    from vlm_jax.models.vlm import with_run_settings

    for name in ("num_examples", "batch_size", "report_examples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    try:
        model_path = resolve_model_dir(args.checkpoint)
    except ValueError as e:
        raise ValueError(f"--checkpoint {e}") from None
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    if not config.get("model"):
        # A recipe that reads its model section from a model directory (model=DIR in its
        # argument, e.g. configs/llava15_siglip.py): the checkpoint is that model.
        config.model = to_dict(load_config(model_path))
    run_config = config_lib.build_run_config(config, jax.device_count(), jax.process_count())
    data = run_config.eval_data or run_config.data
    task = args.task or TASK_OF_DATA.get(data.task)
    if task is None:
        raise ValueError(f"data task {data.task!r} has no evaluation; vlm-jax eval scores "
                         f"{TASK_OF_DATA} (or pass --task)")
    out = args.out or os.path.join(args.checkpoint, f"eval-{task}")
    check_out(out)  # before the model loads: a refused --out costs nothing
    model_config, params, tokenizer = load_model(model_path)
    model_config = with_run_settings(model_config, dtype=args.dtype)
    note = compute_note(model_path, args.dtype)
    if note:
        print(note, file=sys.stderr)
    check_model_fits(task, model_config, tokenizer)
    # Prompts and images as the model was trained on them (a model directory records both).
    trained = load_data_settings(model_path)
    pad_to_square = trained["pad_to_square"] or data.pad_to_square
    template = args.template or trained["template"] or data.template

    started = time.perf_counter()
    examples, skipped = read_examples(data, args.num_examples, args.split,
                                      model_config.vision.image_size, pad_to_square)
    if not examples:
        raise ValueError(f"no usable examples in the evaluation data (skipped: {dict(skipped)})")
    if task == "vqa":
        result = evaluate_vqa(model_config, params, tokenizer, examples, args, template,
                              data.prefix_lm)
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
    from vlm_jax.eval_report import write_report
    write_report(os.path.join(out, "report.html"), f"{task}: {args.checkpoint}",
                 {**result["metrics"], "examples": len(examples), "seconds": round(seconds, 1)},
                 result["table"], result["rows"][:args.report_examples])
    print(result["table"])
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in result["metrics"].items()))
    print(f"wrote {out}/results.json and {out}/report.html ({len(examples)} examples, "
          f"{seconds:.1f} s)")
    return 0


EVAL_OUTPUTS = ("results.json", "report.html")


def check_out(out: str) -> None:
    """An --out eval may write: new, empty, or holding only an earlier eval's outputs (which it
    replaces); anything else in it is not eval's to overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    foreign = sorted(set(os.listdir(out)) - set(EVAL_OUTPUTS)) if os.path.isdir(out) else []
    if foreign:
        raise ValueError(f"--out {out} holds files eval did not write ({', '.join(foreign[:5])}); "
                         f"choose another --out (an earlier eval's {' / '.join(EVAL_OUTPUTS)} "
                         f"alone would be replaced)")


def check_model_fits(task: str, model_config: Any, tokenizer: Any) -> None:
    if model_config.vision is None:
        raise ValueError("the checkpoint has no vision tower; vlm-jax eval scores image tasks")
    if task in ("vqa", "caption") and model_config.llm is None:
        raise ValueError(f"task {task} generates text: the checkpoint needs an LLM (it has "
                         f"none; a contrastive checkpoint is scored with --task retrieval)")
    if task == "retrieval" and model_config.text_tower is None:
        raise ValueError("task retrieval needs a contrastive checkpoint (vision + text tower); "
                         "this one has no text tower")
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer/ directory")


# ----------------------------------------------------------------------------- data

def read_examples(data: Any, num_examples: int, split: str | None, image_size: int,
                  pad_to_square: bool = False) -> tuple[list[Example], collections.Counter]:
    """The first `num_examples` usable raw examples of each source, images decoded (and padded
    to a square first when the model was trained so); examples a source or its images reject
    (SkipExample) are counted by reason and left out."""
    from vlm_jax.data.errors import SkipExample
    from vlm_jax.data.images import decode_image, preprocess_image
    from vlm_jax.data.pipeline import make_source

    examples, skipped = [], collections.Counter()
    for source_config in data.sources:
        if split is not None:
            if source_config.kind not in SPLIT_SOURCES:
                raise ValueError(f"--split: a {source_config.kind} source has no split option "
                                 f"(only {SPLIT_SOURCES}); point eval_data at the evaluation data")
            source_config = dataclasses.replace(
                source_config, options={**source_config.options, "split": split})
        source = make_source(source_config)
        if hasattr(source, "__getitem__"):
            raw_examples = (source[i] for i in range(len(source)))
        else:
            raw_examples = iter(source)
        taken = 0
        while taken < num_examples:
            try:
                raw = next(raw_examples)
                images = [decode_image(image) for image in raw["images"]]
            except StopIteration:
                break
            except SkipExample as e:
                skipped[e.reason] += 1
                continue
            size = (image_size, image_size, 3)
            pixels = (np.stack([preprocess_image(image, image_size, pad_to_square=pad_to_square)
                                for image in images])
                      if images else np.zeros((0,) + size, np.float32))
            examples.append(Example(str(raw.get("id", taken)), images, pixels, raw))
            taken += 1
    return examples, skipped


def _question_type(example: Example, turn: int, answer: str) -> str:
    from vlm_jax.evaluate import GROUNDING, is_box_answer
    types = (example.raw.get("meta") or {}).get("question_types")
    if types and turn < len(types):
        return types[turn]
    return GROUNDING if is_box_answer(answer) else "vqa"


# ----------------------------------------------------------------------------- tasks

def evaluate_vqa(model_config, params, tokenizer, examples: Sequence[Example], args,
                 template: str, prefix_lm: bool = False) -> dict:
    """Every answer turn of every example, greedily, with the earlier turns as context. prefix_lm
    (the data config's): as in training, the images and first question attend to each other
    bidirectionally."""
    from vlm_jax import evaluate
    from vlm_jax.eval_report import ReportRow

    questions = []  # (example, prompt ids, question, reference, type, prefix length)
    for example in examples:
        conversation = example.raw.get("conversation") or []
        turn, prefix = 0, 0
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = evaluate.conversation_prompt_ids(tokenizer, conversation[:index], template,
                                                      model_config.tokens_per_image)
            if turn == 0 and prefix_lm:
                prefix = len(prompt)  # training's mask_ar: 0 up to the first answer token
            question = conversation[index - 1]["content"].replace(tokenizer.image_token, "")
            questions.append((example, prompt, question.strip(), message["content"],
                              _question_type(example, turn, message["content"]), prefix))
            turn += 1
    if not questions:
        raise ValueError("task vqa: the examples hold no conversation with an answer")
    max_new_tokens = args.max_new_tokens or (
        32 if any(q[4] == evaluate.GROUNDING for q in questions) else 16)

    def answers(blank: bool) -> list[str]:
        images = [np.zeros_like(q[0].pixels) if blank else q[0].pixels for q in questions]
        return evaluate.greedy_texts(model_config, params, tokenizer, [q[1] for q in questions],
                                     images, args.batch_size, max_new_tokens,
                                     [q[5] for q in questions] if prefix_lm else None)

    predictions = answers(blank=False)
    items = [evaluate.VQAItem(None, q[2], q[3], q[4], q[0].id) for q in questions]
    columns = {"model": evaluate.accuracy_by_type(items, predictions)}
    if args.blank_baseline:
        columns["blank image"] = evaluate.accuracy_by_type(items, answers(blank=True))
    types = list(columns["model"])
    core = [t for t in types if t != evaluate.GROUNDING] or types
    correct = [evaluate.is_correct(p, q[3], q[4]) for p, q in zip(predictions, questions)]
    metrics = {"accuracy": float(np.mean(correct)),
               "mean_type_accuracy": evaluate.mean_accuracy(columns["model"], core)}
    if evaluate.GROUNDING in columns["model"]:
        hits, total = columns["model"][evaluate.GROUNDING]
        metrics["grounding_iou50_accuracy"] = hits / total
    if args.blank_baseline:
        metrics["blank_image_mean_type_accuracy"] = evaluate.mean_accuracy(
            columns["blank image"], core)
    records = [{"id": q[0].id, "type": q[4], "question": q[2], "answer": q[3], "prediction": p,
                "correct": bool(c)} for q, p, c in zip(questions, predictions, correct)]
    rows = [ReportRow(q[0].images[0] if q[0].images else None, q[2], q[3], p, bool(c), q[4])
            for q, p, c in zip(questions, predictions, correct)]
    return {"metrics": metrics, "predictions": records, "rows": rows,
            "table": evaluate.format_table(columns, core),
            "per_type": {name: {t: {"correct": c, "total": n} for t, (c, n) in table.items()}
                         for name, table in columns.items()}}


def evaluate_captions(model_config, params, tokenizer, examples: Sequence[Example], args) -> dict:
    from vlm_jax import caption_metrics, evaluate
    from vlm_jax.data.errors import SkipExample
    from vlm_jax.data.transforms import caption_of
    from vlm_jax.eval_report import ReportRow

    usable, references = [], []
    for example in examples:
        try:
            references.append([caption_of(example.raw)])
        except SkipExample:
            continue
        usable.append(example)
    if not usable:
        raise ValueError("task caption: no example has a caption")
    prompts = [evaluate.conversation_prompt_ids(
        tokenizer, [{"role": "user", "content": tokenizer.image_token * len(e.images)}], "plain",
        model_config.tokens_per_image) for e in usable]
    predictions = evaluate.greedy_texts(model_config, params, tokenizer, prompts,
                                        [e.pixels for e in usable], args.batch_size,
                                        args.max_new_tokens or 48)
    per_sentence = caption_metrics.cider_d_per_sentence(predictions, references)
    metrics = {"bleu4": caption_metrics.bleu4(predictions, references),
               "cider_d": float(per_sentence.mean())}
    records = [{"id": e.id, "references": refs, "prediction": p, "cider_d": float(c)}
               for e, refs, p, c in zip(usable, references, predictions, per_sentence)]
    rows = [ReportRow(e.images[0] if e.images else None, "", refs[0], p, None, f"CIDEr-D {c:.2f}")
            for e, refs, p, c in zip(usable, references, predictions, per_sentence)]
    table = "\n".join([f"{'captions':<22}{len(usable):>10}", f"{'BLEU-4':<22}{metrics['bleu4']:>10.4f}",
                       f"{'CIDEr-D':<22}{metrics['cider_d']:>10.4f}"])
    return {"metrics": metrics, "predictions": records, "rows": rows, "table": table}


def evaluate_retrieval(model_config, params, tokenizer, examples: Sequence[Example], args,
                       text_len: int) -> dict:
    from vlm_jax import caption_metrics
    from vlm_jax.data.errors import SkipExample
    from vlm_jax.data.transforms import TokenizeContrastive, caption_of
    from vlm_jax.eval_report import ReportRow

    usable, captions = [], []
    for example in examples:
        try:
            caption = caption_of(example.raw)
        except SkipExample:
            continue
        if len(example.images) != 1:
            continue
        usable.append(example)
        captions.append(caption)
    if len(usable) < 2:
        raise ValueError(f"task retrieval needs at least 2 single-image captioned examples, "
                         f"got {len(usable)}")
    tokenize = TokenizeContrastive(tokenizer, min(text_len, model_config.text_tower.max_len))
    text_ids = np.stack([tokenize.map({"caption": c, "images": []})["text_ids"] for c in captions])
    image_embeddings, text_embeddings = contrastive_embeddings(
        model_config, params, np.stack([e.pixels[0] for e in usable]), text_ids, args.batch_size)
    similarity = image_embeddings @ text_embeddings.T          # [images, texts]
    same_text = np.array([[a == b for b in captions] for a in captions])
    image_to_text = caption_metrics.recall_at_k(similarity, same_text)
    text_to_image = caption_metrics.recall_at_k(similarity.T, same_text.T)
    metrics = {f"image_to_text_r@{k}": v for k, v in image_to_text.items()}
    metrics.update({f"text_to_image_r@{k}": v for k, v in text_to_image.items()})
    best_text = similarity.argmax(axis=1)
    hit = same_text[np.arange(len(usable)), best_text]
    records = [{"id": e.id, "caption": c, "top1_caption": captions[j], "hit": bool(h)}
               for e, c, j, h in zip(usable, captions, best_text, hit)]
    rows = [ReportRow(e.images[0], "", c, captions[j], bool(h), "image -> text, top 1")
            for e, c, j, h in zip(usable, captions, best_text, hit)]
    lines = [f"{'':<22}{'R@1':>8}{'R@5':>8}"]
    for name, recall in (("image -> text", image_to_text), ("text -> image", text_to_image)):
        lines.append(f"{name:<22}" + "".join(f"{100 * recall[k]:>7.1f}%" for k in (1, 5)))
    lines.append(f"({len(usable)} image-caption pairs)")
    return {"metrics": metrics, "predictions": records, "rows": rows, "table": "\n".join(lines)}


def contrastive_embeddings(model_config, params, images: np.ndarray, text_ids: np.ndarray,
                           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised SigLIP embeddings f32[N, P] of images f32[N, S, S, 3] and texts i32[N, L],
    in batches of `batch_size` (the last padded, so one program serves all)."""
    import jax

    from vlm_jax.models.vlm import VLM

    @jax.jit
    def embed(params, images, text_ids):
        image, text, _ = VLM(model_config).apply({"params": params}, images, text_ids,
                                                 method=VLM.contrastive_embeddings)
        return image, text

    image_out, text_out = [], []
    for start in range(0, len(images), batch_size):
        rows = list(range(start, min(start + batch_size, len(images))))
        padded = rows + [rows[0]] * (batch_size - len(rows))
        image, text = embed(params, images[padded], text_ids[padded])
        image_out.append(np.asarray(image)[:len(rows)])
        text_out.append(np.asarray(text)[:len(rows)])
    return np.concatenate(image_out), np.concatenate(text_out)
