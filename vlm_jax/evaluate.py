"""VQA evaluation: exact match after standard answer normalisation, per question type, with baselines.

    items = shapes_vqa_items(num_per_type=200, image_size=48)            # held-out test scenes
    predictions = predict_answers(model_config, params, tokenizer, items, template="minimal")
    table = accuracy_by_type(items, predictions)                          # {type: (correct, total)}
    majority = majority_baseline(shapes_vqa_items(split="train", ...))   # {type: answer}

Scoring: an answer is right when its normalised text equals the reference's (VQA-style
normalisation: lower case, punctuation and articles dropped, number words as digits). A
"grounding" answer is a box "[x0, y0, x1, y1]"; it counts as right when its IoU with the reference
box is at least 0.5 (exact integer match would be meaningless), and is reported as such.

The two baselines: the majority answer of each question type (counted on training questions), and
the model itself with every image blanked out (all pixels mid-grey), which shows how much of the
accuracy the image carries.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_jax.data.images import preprocess_image
from vlm_jax.data.sources import shapes
from vlm_jax.data.templates import get_template
from vlm_jax.generate import greedy_generate

GROUNDING = "grounding"
GROUNDING_IOU = 0.5
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_BOX = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One question about one image: image u8[S, S, 3], the reference answer and its type."""
    image: np.ndarray
    question: str
    answer: str
    question_type: str
    example_id: str


# ----------------------------------------------------------------------------- scoring

def normalize_answer(text: str) -> str:
    """VQA-style: lower case, punctuation to spaces, number words to digits, articles dropped,
    whitespace collapsed. ("The Red." -> "red", "Two" -> "2", "top-left" -> "top left")."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x0, y0, x1, y1]" in `text`, or None."""
    match = _BOX.search(text)
    return None if match is None else tuple(float(v) for v in match.groups())


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 for degenerate boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 and inter > 0 else 0.0


def is_correct(prediction: str, answer: str, question_type: str = "") -> bool:
    """Exact match after normalisation; grounding: box IoU >= GROUNDING_IOU."""
    if question_type == GROUNDING:
        predicted, reference = parse_box(prediction), parse_box(answer)
        return (predicted is not None and reference is not None
                and box_iou(predicted, reference) >= GROUNDING_IOU)
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy_by_type(items: Sequence[VQAItem], predictions: Sequence[str]
                     ) -> dict[str, tuple[int, int]]:
    """{question_type: (correct, total)} in first-seen type order."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    table: dict[str, list[int]] = {}
    for item, prediction in zip(items, predictions):
        counts = table.setdefault(item.question_type, [0, 0])
        counts[0] += is_correct(prediction, item.answer, item.question_type)
        counts[1] += 1
    return {t: (c, n) for t, (c, n) in table.items()}


def mean_accuracy(table: Mapping[str, tuple[int, int]], types: Sequence[str] | None = None) -> float:
    """Unweighted mean over question types of the per-type accuracy (each type counts once)."""
    types = list(table) if types is None else [t for t in types if t in table]
    if not types:
        raise ValueError(f"none of the question types {types} is in the table ({list(table)})")
    return float(np.mean([table[t][0] / table[t][1] for t in types]))


# ----------------------------------------------------------------------------- baselines

def majority_baseline(train_items: Sequence[VQAItem]) -> dict[str, str]:
    """The most frequent normalised answer of each question type (ties: first seen)."""
    counters: dict[str, collections.Counter] = {}
    for item in train_items:
        counters.setdefault(item.question_type, collections.Counter())[
            normalize_answer(item.answer)] += 1
    return {t: counter.most_common(1)[0][0] for t, counter in counters.items()}


def majority_predictions(items: Sequence[VQAItem], majority: Mapping[str, str]) -> list[str]:
    return [majority.get(item.question_type, "") for item in items]


# ----------------------------------------------------------------------------- data

def shapes_vqa_items(split: str = "test", num_per_type: int = 200, image_size: int = 224,
                     question_types: Sequence[str] = shapes.QUESTION_TYPES, seed: int = 0,
                     first_index: int = 0) -> list[VQAItem]:
    """`num_per_type` single-question items per type from the shapes world's `split`. Item i of
    every type comes from scene i where that scene admits the type's question (a relation needs
    two objects, a position question a uniquely named object); else from the scene the source
    redraws in its place, so compare images before treating items as one conversation."""
    items = []
    for question_type in question_types:
        source = shapes.ShapesSource(split=split, seed=seed, image_size=image_size,
                                     turns_per_example=1, question_types=(question_type,))
        for index in range(first_index, first_index + num_per_type):
            scene, [(_, question, answer)] = source.sample(index)
            items.append(VQAItem(shapes.render(scene, image_size), question, answer, question_type,
                                 f"shapes:{split}:{seed}:{index}:{question_type}"))
    return items


# ----------------------------------------------------------------------------- prediction

def prompt_ids(tokenizer: Any, question: str, template: str, num_image_tokens: int) -> np.ndarray:
    """i32[T]: the template's text up to where the answer starts, one `<image>` before the
    question, expanded to `num_image_tokens` image tokens."""
    conversation = [{"role": "user", "content": f"{tokenizer.image_token}\n{question}"},
                    {"role": "assistant", "content": ""}]
    pieces = get_template(template).render(conversation, tokenizer.bos_token, tokenizer.eos_token)
    first_target = next(i for i, (_, is_target) in enumerate(pieces) if is_target)
    ids = np.asarray(tokenizer.encode("".join(text for text, _ in pieces[:first_target])), np.int32)
    is_image = ids == tokenizer.image_token_id
    return np.repeat(ids, np.where(is_image, num_image_tokens, 1))


def predict_answers(model_config: Any, params: Any, tokenizer: Any, items: Sequence[VQAItem],
                    template: str, blank_images: bool = False, batch_size: int = 128,
                    max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers, one per item. `blank_images` replaces every image by mid-grey pixels.
    max_new_tokens: default 24 when a grounding question is present (a box is ~20 tokens), else 6."""
    if max_new_tokens is None:
        max_new_tokens = 24 if any(i.question_type == GROUNDING for i in items) else 6
    size = model_config.vision.image_size
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]
    prompts = [prompt_ids(tokenizer, item.question, template, model_config.tokens_per_image)
               for item in items]
    # One padded length for all batches: one compiled program.
    width = max(len(p) for p in prompts)
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = range(start, min(start + batch_size, len(items)))
        rows = batch_size  # the last batch is padded with copies of its first row
        ids = np.zeros((rows, width), np.int32)
        lengths = np.ones((rows,), np.int32)
        images = np.zeros((rows, 1, size, size, 3), np.float32)
        for row, index in enumerate(list(chunk) + [chunk[0]] * (rows - len(chunk))):
            ids[row, :len(prompts[index])] = prompts[index]
            lengths[row] = len(prompts[index])
            if not blank_images:
                images[row, 0] = preprocess_image(items[index].image, size)
        tokens, counts = greedy_generate(model_config, params, ids, lengths, images,
                                         max_new_tokens, stop_ids)
        answers += [tokenizer.decode(tokens[row, :counts[row]]).strip()
                    for row in range(len(chunk))]
    return answers


# ----------------------------------------------------------------------------- report

def format_table(columns: Mapping[str, Mapping[str, tuple[int, int]]],
                 core_types: Sequence[str]) -> str:
    """A text table: one row per question type, one column per system (model, baselines ...),
    then the mean over `core_types` and over all types. Grounding is marked as IoU >= 0.5."""
    names = list(columns)
    types = list(dict.fromkeys(t for table in columns.values() for t in table))
    header = f"{'question type':<22}" + "".join(f"{name:>16}" for name in names)
    lines = [header, "-" * len(header)]
    for question_type in types:
        label = question_type + (" (IoU>=0.5)" if question_type == GROUNDING else "")
        cells = []
        for name in names:
            correct, total = columns[name].get(question_type, (0, 0))
            cells.append(f"{100.0 * correct / total:>15.1f}%" if total else f"{'-':>16}")
        lines.append(f"{label:<22}" + "".join(cells))
    lines.append("-" * len(header))
    for label, subset in ((f"overall ({len(core_types)} core)", core_types), ("overall (all)", types)):
        cells = [f"{100.0 * mean_accuracy(columns[name], subset):>15.1f}%" for name in names]
        lines.append(f"{label:<22}" + "".join(cells))
    return "\n".join(lines)
