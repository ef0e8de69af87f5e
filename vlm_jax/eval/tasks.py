"""What `vlm-jax eval` measures, per task, on examples read from a config's data:

    vqa        every assistant turn is one question. Its prompt is the conversation up to that
               turn, earlier turns with their reference answers (as training saw them). Exact
               match after the VQA answer normalisation (eval/vqa.py); box answers
               "[x0, y0, x1, y1]" (type `grounding`) count when IoU >= 0.5. One row per question
               type (from the source's meta["question_types"], e.g. shapes; else "vqa" /
               "grounding").
    caption    the "plain" template's image prefix, greedy caption up to EOS; BLEU-4 and CIDEr-D
               against the example's caption (eval/captions.py).
    retrieval  SigLIP image and text embeddings; image->text and text->image recall@1/5
               (captions with identical text count as the same).

Each task returns {"metrics", "predictions", "rows" (for report.html), "table"}. `settings` is
anything with `batch_size`, `max_new_tokens` (None: the task's default) and, for vqa,
`blank_baseline` (score once more with every image blanked: the share the text alone explains).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.errors import SkipExample
from vlm_jax.data import tiling
from vlm_jax.data.images import decode_image
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.data.pipeline import make_source
from vlm_jax.data.transforms import TokenizeContrastive, caption_of
from vlm_jax.errors import CheckpointError, DataError, InputError
from vlm_jax.eval import captions as caption_metrics
from vlm_jax.eval import vqa
from vlm_jax.eval.report import ReportRow
from vlm_jax.inference.batching import greedy_texts
from vlm_jax.inference.prompts import conversation_prompt_ids
from vlm_jax.models.vlm import VLM, itm_inputs

TASK_OF_DATA = {"instruct": "vqa", "align": "caption", "contrastive": "retrieval"}
TASKS = ("vqa", "caption", "retrieval")
SPLIT_SOURCES = ("shapes", "tfds")  # source kinds whose options take a `split`


@dataclasses.dataclass
class Example:
    """One raw example, decoded: images u8[H, W, 3] (for the report) and model inputs."""
    id: str
    images: list[np.ndarray]
    pixels: np.ndarray          # f32[M, S, S, 3], SigLIP-normalised (a tiled model: all tiles)
    raw: dict
    grids: list | None = None   # a tiled model: (rows, cols) per image (data/tiling.py)


EVAL_OUTPUTS = ("results.json", "report.html")


def check_out(out: str) -> None:
    """An --out eval may write: new, empty, or holding only an earlier eval's outputs (which it
    replaces); anything else in it is not eval's to overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a directory")
    foreign = sorted(set(os.listdir(out)) - set(EVAL_OUTPUTS)) if os.path.isdir(out) else []
    if foreign:
        raise InputError(f"--out {out} holds files eval did not write ({', '.join(foreign[:5])}); "
                         f"choose another --out (an earlier eval's {' / '.join(EVAL_OUTPUTS)} "
                         f"alone would be replaced)")


def check_model_fits(task: str, model_config: Any, tokenizer: Any) -> None:
    if model_config.vision is None:
        raise CheckpointError("the checkpoint has no vision tower; vlm-jax eval scores image tasks")
    if task in ("vqa", "caption") and model_config.llm is None:
        raise CheckpointError(f"task {task} generates text: the checkpoint needs an LLM (it has "
                              f"none; a contrastive checkpoint is scored with --task retrieval)")
    if task == "retrieval" and model_config.text_tower is None:
        raise CheckpointError("task retrieval needs a contrastive checkpoint (vision + text tower); "
                              "this one has no text tower")
    if tokenizer is None:
        raise CheckpointError("the checkpoint has no tokenizer/ directory")


# ----------------------------------------------------------------------------- data

def read_examples(data: Any, num_examples: int, split: str | None, image_size: int,
                  pad_to_square: bool = False, tiling_config: TilingConfig | None = None
                  ) -> tuple[list[Example], collections.Counter]:
    """The first `num_examples` usable raw examples of each source, images decoded (and padded
    to a square first when the model was trained so, cut into tiles when it was trained with
    them); examples a source or its images reject (SkipExample) are counted by reason and left
    out."""

    examples, skipped = [], collections.Counter()
    for source_config in data.sources:
        if split is not None:
            if source_config.kind not in SPLIT_SOURCES:
                raise InputError(f"--split: a {source_config.kind} source has no split option "
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
            inputs = [tiling.model_images(image, image_size, pad_to_square, tiling_config)
                      for image in images]
            pixels = (np.concatenate([tiles for tiles, _ in inputs])
                      if images else np.zeros((0,) + size, np.float32))
            grids = ([grid for _, grid in inputs]
                     if tiling_config is not None and tiling_config.enabled else None)
            examples.append(Example(str(raw.get("id", taken)), images, pixels, raw, grids))
            taken += 1
    return examples, skipped


def _question_type(example: Example, turn: int, answer: str) -> str:
    types = (example.raw.get("meta") or {}).get("question_types")
    if types and turn < len(types):
        return types[turn]
    return vqa.GROUNDING if vqa.is_box_answer(answer) else "vqa"


# ----------------------------------------------------------------------------- tasks

def evaluate_vqa(model_config, params, tokenizer, examples: Sequence[Example], settings,
                 template: str, prefix_lm: bool = False) -> dict:
    """Every answer turn of every example, greedily, with the earlier turns as context. prefix_lm
    (the data config's): as in training, the images and first question attend to each other
    bidirectionally."""

    questions = []  # (example, prompt ids, question, reference, type, prefix length)
    for example in examples:
        conversation = example.raw.get("conversation") or []
        turn, prefix = 0, 0
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            grids = example.grids
            if grids is not None:  # the images placed so far (later turns may add more)
                grids = grids[:sum(m["content"].count(tokenizer.image_token)
                                   for m in conversation[:index])]
            prompt = conversation_prompt_ids(tokenizer, conversation[:index], template,
                                             model_config.tokens_per_image, grids)
            if turn == 0 and prefix_lm:
                prefix = len(prompt)  # training's mask_ar: 0 up to the first answer token
            question = conversation[index - 1]["content"].replace(tokenizer.image_token, "")
            questions.append((example, prompt, question.strip(), message["content"],
                              _question_type(example, turn, message["content"]), prefix))
            turn += 1
    if not questions:
        raise DataError("task vqa: the examples hold no conversation with an answer")
    max_new_tokens = settings.max_new_tokens or (
        32 if any(q[4] == vqa.GROUNDING for q in questions) else 16)

    def answers(blank: bool) -> list[str]:
        images = [np.zeros_like(q[0].pixels) if blank else q[0].pixels for q in questions]
        return greedy_texts(model_config, params, tokenizer, [q[1] for q in questions],
                                     images, settings.batch_size, max_new_tokens,
                                     [q[5] for q in questions] if prefix_lm else None)

    predictions = answers(blank=False)
    items = [vqa.VQAItem(None, q[2], q[3], q[4], q[0].id) for q in questions]
    columns = {"model": vqa.accuracy_by_type(items, predictions)}
    if settings.blank_baseline:
        columns["blank image"] = vqa.accuracy_by_type(items, answers(blank=True))
    types = list(columns["model"])
    core = [t for t in types if t != vqa.GROUNDING] or types
    correct = [vqa.is_correct(p, q[3], q[4]) for p, q in zip(predictions, questions)]
    metrics = {"accuracy": float(np.mean(correct)),
               "mean_type_accuracy": vqa.mean_accuracy(columns["model"], core)}
    if vqa.GROUNDING in columns["model"]:
        hits, total = columns["model"][vqa.GROUNDING]
        metrics["grounding_iou50_accuracy"] = hits / total
    if settings.blank_baseline:
        metrics["blank_image_mean_type_accuracy"] = vqa.mean_accuracy(
            columns["blank image"], core)
    records = [{"id": q[0].id, "type": q[4], "question": q[2], "answer": q[3], "prediction": p,
                "correct": bool(c)} for q, p, c in zip(questions, predictions, correct)]
    rows = [ReportRow(q[0].images[0] if q[0].images else None, q[2], q[3], p, bool(c), q[4])
            for q, p, c in zip(questions, predictions, correct)]
    return {"metrics": metrics, "predictions": records, "rows": rows,
            "table": vqa.format_table(columns, core),
            "per_type": {name: {t: {"correct": c, "total": n} for t, (c, n) in table.items()}
                         for name, table in columns.items()}}


def evaluate_captions(model_config, params, tokenizer, examples: Sequence[Example], settings) -> dict:

    usable, references = [], []
    for example in examples:
        try:
            references.append([caption_of(example.raw)])
        except SkipExample:
            continue
        usable.append(example)
    if not usable:
        raise DataError("task caption: no example has a caption")
    prompts = [conversation_prompt_ids(
        tokenizer, [{"role": "user", "content": tokenizer.image_token * len(e.images)}], "plain",
        model_config.tokens_per_image, e.grids) for e in usable]
    predictions = greedy_texts(model_config, params, tokenizer, prompts,
                                        [e.pixels for e in usable], settings.batch_size,
                                        settings.max_new_tokens or 48)
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


def evaluate_retrieval(model_config, params, tokenizer, examples: Sequence[Example], settings,
                       text_len: int) -> dict:

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
        raise DataError(f"task retrieval needs at least 2 single-image captioned examples, "
                        f"got {len(usable)}")
    tokenize = TokenizeContrastive(tokenizer, min(text_len, model_config.text_tower.max_len))
    tokenized = [tokenize.map({"caption": c, "images": []}) for c in captions]
    text_ids = np.stack([t["text_ids"] for t in tokenized])
    text_lengths = np.array([t["text_lengths"] for t in tokenized], np.int32)
    pixels = np.stack([e.pixels[0] for e in usable])
    image_embeddings, text_embeddings = contrastive_embeddings(
        model_config, params, pixels, text_ids, settings.batch_size)
    similarity = image_embeddings @ text_embeddings.T          # [images, texts]
    same_text = np.array([[a == b for b in captions] for a in captions])
    image_to_text = caption_metrics.recall_at_k(similarity, same_text)
    text_to_image = caption_metrics.recall_at_k(similarity.T, same_text.T)
    metrics = {f"image_to_text_r@{k}": v for k, v in image_to_text.items()}
    metrics.update({f"text_to_image_r@{k}": v for k, v in text_to_image.items()})
    reranked = None
    if model_config.itm_head:
        score = functools.partial(itm_scores, model_config, params, pixels, text_ids, text_lengths,
                                  batch_size=settings.batch_size)
        metrics["itm_accuracy"] = itm_accuracy(score, similarity, same_text)
        reranked = {"image -> text, ITM re-ranked": caption_metrics.recall_at_k(
                        rerank(score, similarity, RERANK_CANDIDATES), same_text),
                    "text -> image, ITM re-ranked": caption_metrics.recall_at_k(
                        rerank(lambda t, i: score(i, t), similarity.T, RERANK_CANDIDATES),
                        same_text.T)}
        for name, recall in reranked.items():
            key = "image_to_text" if name.startswith("image") else "text_to_image"
            metrics.update({f"{key}_itm_r@{k}": v for k, v in recall.items()})
    best_text = similarity.argmax(axis=1)
    hit = same_text[np.arange(len(usable)), best_text]
    records = [{"id": e.id, "caption": c, "top1_caption": captions[j], "hit": bool(h)}
               for e, c, j, h in zip(usable, captions, best_text, hit)]
    rows = [ReportRow(e.images[0], "", c, captions[j], bool(h), "image -> text, top 1")
            for e, c, j, h in zip(usable, captions, best_text, hit)]
    width = 32 if reranked else 22
    lines = [f"{'':<{width}}{'R@1':>8}{'R@5':>8}"]
    recalls = {"image -> text": image_to_text, "text -> image": text_to_image, **(reranked or {})}
    for name, recall in recalls.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * recall[k]:>7.1f}%" for k in (1, 5)))
    if reranked:
        lines.append(f"{'ITM accuracy':<{width}}{100 * metrics['itm_accuracy']:>7.1f}%  (each "
                     f"image with its caption and its most similar other caption; re-ranking "
                     f"scores the top {RERANK_CANDIDATES} by similarity)")
    lines.append(f"({len(usable)} image-caption pairs)")
    return {"metrics": metrics, "predictions": records, "rows": rows, "table": "\n".join(lines)}


RERANK_CANDIDATES = 16  # retrieval re-ranking: the ITM head scores this many best by similarity


def itm_scores(model_config, params, pixels: np.ndarray, text_ids: np.ndarray,
               text_lengths: np.ndarray, image_index: np.ndarray, text_index: np.ndarray,
               batch_size: int) -> np.ndarray:
    """ITM logits f32[R] of the pairs (pixels[image_index[r]], caption text_index[r]), in
    batches of `batch_size` pairs (the last padded, so one program serves all)."""
    logits = _itm_program(model_config)
    image_index, text_index = np.asarray(image_index), np.asarray(text_index)
    out = []
    for start in range(0, len(image_index), batch_size):
        rows = list(range(start, min(start + batch_size, len(image_index))))
        padded = rows + [rows[0]] * (batch_size - len(rows))
        images, texts = image_index[padded], text_index[padded]
        out.append(np.asarray(logits(params, pixels[images], text_ids[texts],
                                     text_lengths[texts]))[:len(rows)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.lru_cache(maxsize=8)
def _itm_program(model_config):
    """The jitted pair scorer of `model_config`, built once: accuracy, re-ranking both ways and
    the shapes runner call `itm_scores` several times on the same model."""

    @jax.jit
    def logits(params, images, ids, lengths):
        ids, last = itm_inputs(model_config, ids, lengths)
        return VLM(model_config).apply({"params": params}, ids, images, last,
                                       jnp.arange(ids.shape[0]), method=VLM.itm_logits)
    return logits


def itm_accuracy(score, similarity: np.ndarray, same_text: np.ndarray) -> float:
    """Matching accuracy on each image's caption (label 1) and its most similar caption that
    is not the same text (label 0, a hard negative); `score(image_index, text_index)`."""
    images = np.arange(len(similarity))
    hardest = np.where(same_text, -np.inf, similarity).argmax(axis=1)
    has_negative = ~same_text.all(axis=1)
    logits = score(np.concatenate([images, images[has_negative]]),
                   np.concatenate([images, hardest[has_negative]]))
    labels = np.concatenate([np.ones(len(images)), np.zeros(int(has_negative.sum()))])
    return float(np.mean((logits > 0) == (labels > 0.5)))


def rerank(score, similarity: np.ndarray, candidates: int) -> np.ndarray:
    """A [queries, items] score matrix ranking, per query, its `candidates` most similar items
    by their ITM logit (`score(query_index, item_index)`), above every other item (which keep
    their similarity order): what `recall_at_k` of the re-ranked retrieval reads."""
    k = min(candidates, similarity.shape[1])
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]           # [Q, k]
    queries = np.repeat(np.arange(len(similarity)), k)
    logits = score(queries, top.reshape(-1)).reshape(top.shape)
    spread = float(np.ptp(similarity)) + 1.0
    ranked = similarity - similarity.max() - spread                        # below any candidate
    np.put_along_axis(ranked, top, logits - logits.min() + 1.0, axis=1)
    return ranked


def contrastive_embeddings(model_config, params, images: np.ndarray, text_ids: np.ndarray,
                           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised SigLIP embeddings f32[N, P] of images f32[N, S, S, 3] and texts i32[N, L],
    in batches of `batch_size` (the last padded, so one program serves all)."""

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
