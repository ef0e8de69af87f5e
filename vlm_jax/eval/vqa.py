"""VQA evaluation: exact match after standard answer normalisation, per question type, with baselines.

    items = shapes_vqa_items(num_per_type=200, image_size=48)            # held-out test scenes
    predictions = predict_answers(model_config, params, tokenizer, items, template="minimal")
    table = accuracy_by_type(items, predictions)                          # {type: (correct, total)}
    majority = majority_baseline(shapes_vqa_items(split="train", ...))   # {type: answer}

Scoring: an answer is right when its normalised text equals the reference's (the official VQA
answer normalisation, `normalize_answer`). A "grounding" answer is a box "[x0, y0, x1, y1]"; it
counts as right when its IoU with the reference box is at least 0.5 (exact integer match would be
meaningless), and is reported as such.

Answers come from batched KV-cache greedy decoding (`inference.batching.greedy_texts`). The
`vlm-jax eval` command (config data -> VQA / captioning / retrieval, results.json and an HTML
report) is `vlm_jax/cli/eval.py`, its tasks `vlm_jax/eval/tasks.py`.

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

from vlm_jax.data import tiling
from vlm_jax.data.sources import shapes
from vlm_jax.inference.batching import greedy_texts
from vlm_jax.inference.prompts import prompt_ids

GROUNDING = "grounding"
GROUNDING_IOU = 0.5
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA evaluation's punctuation list (apostrophes, colons, '$', '%', '&', '#', '*' are kept).
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" means, as written: any period not followed by a digit.
_PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")
# Contractions as the VQA evaluation writes them; answers spelled without the apostrophe(s)
# ("dont", "couldnt've") are mapped onto these.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've "
    "it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't 'ow's'at shan't she'd she'd've she'll she's should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd we'd've we'll we're we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_spellings() -> dict[str, str]:
    """Every spelling with one or more of a contraction's apostrophes left out -> the contraction
    (for words with two apostrophes, dropping just one also counts: "couldnt've", "couldn'tve")."""
    table = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        for keep in range(2 ** (len(parts) - 1) - 1):  # bit i set = apostrophe i kept; not all
            spelled = parts[0]
            for i, part in enumerate(parts[1:]):
                spelled += ("'" if keep >> i & 1 else "") + part
            table[spelled] = word
    return table


_CONTRACTION_SPELLINGS = _contraction_spellings()
_BOX = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One question about one image: image u8[S, S, 3] (None where only scoring needs the item),
    the reference answer and its type."""
    image: np.ndarray
    question: str
    answer: str
    question_type: str
    example_id: str


# ----------------------------------------------------------------------------- scoring

def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation ("The Red." -> "red", "Two" -> "2",
    "top-left" -> "top left", "dont" -> "don't", "3,000" -> "3000").

    In order: newlines and tabs to spaces; each punctuation mark of the official list removed
    where it touches a space (or anywhere, once the text holds a digit-comma-digit) and replaced
    by a space elsewhere; periods dropped unless followed by a digit ("3.5" stays); lower case;
    number words zero..ten to digits; articles a/an/the dropped; contractions spelled without
    their apostrophe(s) restored. The official script skips all of this when the ten human answers
    agree; here it always applies (as lmms-eval does), which is what a single reference needs.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    drop_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touching_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touching_space or drop_marks else " ")
    out = _PERIOD_NOT_IN_NUMBER.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTION_SPELLINGS.get(w, w) for w in words if w not in _ARTICLES)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x0, y0, x1, y1]" in `text`, or None."""
    match = _BOX.search(text)
    return None if match is None else tuple(float(v) for v in match.groups())


def is_box_answer(text: str) -> bool:
    """Whether `text` is exactly one box "[x0, y0, x1, y1]" (a grounding answer)."""
    return _BOX.fullmatch(text.strip()) is not None


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
                     first_index: int = 0, style: str = "scene",
                     world: Mapping[str, Sequence[str]] | None = None) -> list[VQAItem]:
    """`num_per_type` single-question items per type from the shapes world's `split`. Item i of
    every type comes from scene i where that scene admits the type's question (a relation needs
    two objects, a position question a uniquely named object); else from the scene the source
    redraws in its place, so compare images before treating items as one conversation.
    style: the world's rendering ("scene" or the diagnostic "codes", see ShapesSource).
    world: ShapesSource's `shapes` / `colors` / `sizes` (default: the whole world)."""
    items = []
    for question_type in question_types:
        source = shapes.ShapesSource(split=split, seed=seed, image_size=image_size,
                                     turns_per_example=1, question_types=(question_type,),
                                     style=style, **(world or {}))
        for index in range(first_index, first_index + num_per_type):
            scene, [(_, question, answer)] = source.sample(index)
            items.append(VQAItem(source.render(scene), question, answer, question_type,
                                 f"shapes:{split}:{seed}:{index}:{question_type}"))
    return items


# ----------------------------------------------------------------------------- prediction

def predict_answers(model_config: Any, params: Any, tokenizer: Any, items: Sequence[VQAItem],
                    template: str, blank_images: bool = False, batch_size: int = 128,
                    max_new_tokens: int | None = None,
                    tiling_config: tiling.TilingConfig | None = None) -> list[str]:
    """Greedy answers (KV-cache decoding), one per item. `blank_images` replaces every image (or
    tile) by mid-grey pixels. max_new_tokens: default 24 when a grounding question is present (a
    box is ~20 tokens), else 6. `tiling_config`: the model reads tiles (data/tiling.py)."""
    if max_new_tokens is None:
        max_new_tokens = 24 if any(i.question_type == GROUNDING for i in items) else 6
    size = model_config.vision.image_size
    inputs = [tiling.model_images(item.image, size, config=tiling_config) for item in items]
    prompts = [prompt_ids(tokenizer, item.question, template, model_config.tokens_per_image, grid)
               for item, (_, grid) in zip(items, inputs)]
    images = [np.zeros_like(tiles) if blank_images else tiles for tiles, _ in inputs]
    return greedy_texts(model_config, params, tokenizer, prompts, images, batch_size,
                        max_new_tokens)


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
