"""What `vlm-jax inspect-data` shows (the command is `vlm_jax/cli/inspect_data.py`): what
`vlm-jax train` feeds the model, by example and by row.

With --config (FILE[:ARG] and --config.a.b=V overrides, read as `vlm-jax train` reads them) the
data is the validated run config's `data` (`eval_data` with --split eval): seq_len, template,
packing, too_long, pad_to_square, and the image size and image-token count the model sets. The
tokenizer is the trainer's (`build_tokenizer`): a shapes tokenizer is fitted into a temporary
directory, or the one saved in a run's --workdir is reused. Without --config, direct flags
describe the data (no model: --image-size and --num-image-tokens say what it would read).

Shown, on the terminal and in an HTML contact sheet (--out, images inline as PNG):
  * the first N examples of the first source in source order, through the training transform:
    the learned (loss-masked) part marked, image spans as `<image x196>`, token counts, and why
    an example is skipped;
  * the trainer's first batch (`build_pipeline`, as the trainer calls it): every row's packing
    layout, the text of the first --rows rows segment by segment, and the skip counts so far.

    vlm-jax inspect-data --config configs/tiny.py:phase=instruct --out /tmp/data.html
    vlm-jax inspect-data --config configs/tiny.py:phase=align --config.data.seq_len=48 --split eval
    vlm-jax inspect-data --source llava_json --path data/llava.json --tokenizer tok/ \\
        --template vicuna --num-image-tokens 576 --seq-len 2048 --out /tmp/llava.html
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from vlm_jax.data import pipeline
from vlm_jax.data.skips import (GuardedSource, GuardedTransform, RowFitCheck, SkippedExample,
                                one_image_check)
from vlm_jax.data.tokenizer import Tokenizer

ANSI_LEARNED, ANSI_IMAGE, ANSI_RESET = "\033[32m", "\033[36m", "\033[0m"
# Marks the pages write_html writes: `vlm-jax inspect-data` replaces only such a page.
HTML_GENERATOR = '<meta name="generator" content="vlm-jax inspect-data">'


@dataclasses.dataclass
class Span:
    """A run of tokens shown together: text, an image run, learned or not."""
    text: str
    num_tokens: int
    learned: bool
    is_image: bool


@dataclasses.dataclass
class Inspection:
    """Everything inspect-data shows, as arrays. `examples`: the first raw examples of the first
    source in source order, each {"index", "id", and "example" (a TOKENIZED EXAMPLE) or
    "skipped" (reason: detail)}; `batch`: the trainer's first BATCH (None when the data ends
    before one); `skip_counts`: the pipeline's counters after it; `stopped`: why the trainer
    would stop on its first batch (too many skipped examples), else None."""
    data: pipeline.DataConfig
    tokenizer: Tokenizer
    examples: list[dict[str, Any]]
    batch: dict[str, np.ndarray] | None
    skip_counts: dict[str, Any]
    stopped: str | None = None


def inspect_examples(cfg: pipeline.DataConfig, tokenizer: Tokenizer, num_examples: int
                     ) -> list[dict[str, Any]]:
    """The first `num_examples` raw examples of the first source, each transformed and checked as
    the pipeline does (or the reason it is skipped), in source order."""
    name = f"{cfg.sources[0].kind}0"  # as build_pipeline names it
    source = GuardedSource(pipeline.make_source(cfg.sources[0]), name)
    # The check build_example_dataset applies after the transform.
    check = one_image_check if cfg.task == "contrastive" else RowFitCheck(cfg.row_spec)
    transform = GuardedTransform(pipeline.make_example_transform(cfg, tokenizer), name, check)
    results = []
    for index in range(min(num_examples, len(source))):
        raw = source[index]
        example = transform(raw)
        record: dict[str, Any] = {"index": index, "id": f"{name}[{index}]" if isinstance(
            raw, SkippedExample) else raw["id"]}
        if isinstance(example, SkippedExample):
            record["skipped"] = f"{example.reason}: {example.detail}"
        else:
            record["example"] = example
        results.append(record)
    return results


def token_spans(tokenizer: Tokenizer, example: Mapping[str, np.ndarray]) -> list[Span]:
    """Runs of input tokens with the same (learned, is_image) flags, decoded for display.
    Token t is learned when it is a target, i.e. loss_mask[t - 1] = 1."""
    ids = np.asarray(example["input_ids"])
    learned = np.concatenate([[False], np.asarray(example["loss_mask"])[:-1] > 0])
    is_image = ids == tokenizer.image_token_id
    spans: list[Span] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t < len(ids) and (learned[t], is_image[t]) == (learned[start], is_image[start]):
            continue
        if is_image[start]:
            text = f"{tokenizer.image_token[:-1]} x{t - start}>"
        else:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
        spans.append(Span(text, t - start, bool(learned[start]), bool(is_image[start])))
        start = t
    return spans


def row_segments(tokenizer: Tokenizer, batch: Mapping[str, np.ndarray], row: int
                 ) -> list[list[Span]]:
    """The spans of each packed example (segment 1, 2, ...) of one batch row; padding left out."""
    segment_ids = np.asarray(batch["segment_ids"][row])
    return [token_spans(tokenizer, {key: np.asarray(batch[key][row])[segment_ids == segment]
                                    for key in ("input_ids", "loss_mask")})
            for segment in np.unique(segment_ids) if segment]


def batch_layout(batch: Mapping[str, np.ndarray]) -> list[str]:
    """One line per row: the segments (packed examples) with their token counts, padding, images."""
    if "segment_ids" not in batch:
        return [f"contrastive batch: images {batch['images'].shape}, text_ids "
                f"{batch['text_ids'].shape}"]
    lines = []
    for row, segment_ids in enumerate(np.asarray(batch["segment_ids"])):
        segments = [f"#{s}:{int((segment_ids == s).sum())}" for s in np.unique(segment_ids) if s]
        padding = int((segment_ids == 0).sum())
        learned = int(np.asarray(batch["loss_mask"])[row].sum())
        lines.append(f"row {row}: {' '.join(segments)}  pad:{padding}  learned:{learned}  "
                     f"images:{int(np.asarray(batch['num_images'])[row])}")
    return lines


def row_images(batch: Mapping[str, np.ndarray], row: int) -> np.ndarray:
    """u8[N, S, S, 3]: the images of one batch row (its used image slots)."""
    if "text_ids" in batch:  # contrastive: one image per row
        return np.asarray(batch["images"][row])[None]
    return np.asarray(batch["images"][row][:int(batch["num_images"][row])])


def terminal_text(spans: Sequence[Span], color: bool) -> str:
    parts = []
    for span in spans:
        if span.learned:
            parts.append(f"{ANSI_LEARNED}{span.text}{ANSI_RESET}" if color else f"[[{span.text}]]")
        elif span.is_image and color:
            parts.append(f"{ANSI_IMAGE}{span.text}{ANSI_RESET}")
        else:
            parts.append(span.text)
    return "".join(parts)


def describe(inspection: Inspection) -> str:
    cfg = inspection.data
    return (f"task={cfg.task} template={cfg.template} seq_len={cfg.seq_len} "
            f"image_size={cfg.image_size} num_image_tokens={cfg.num_image_tokens} "
            f"packing={cfg.packing} too_long={cfg.too_long} pad_to_square={cfg.pad_to_square} "
            f"batch_size={cfg.batch_size}")


def print_inspection(inspection: Inspection, num_rows: int, color: bool) -> None:
    tokenizer, batch = inspection.tokenizer, inspection.batch
    print(describe(inspection))
    print(f"=== first {len(inspection.examples)} examples of data.sources[0] "
          f"({inspection.data.sources[0].kind}), in source order")
    for record in inspection.examples:
        print(f"--- {record['id']}")
        if "skipped" in record:
            print(f"skipped: {record['skipped']}")
            continue
        example = record["example"]
        if "text_ids" in example:
            print(f"text_ids ({len(example['text_ids'])}): {example['text_ids'].tolist()}")
            print(tokenizer.decode(example["text_ids"]))
            continue
        print(f"{len(example['input_ids'])} tokens, {int(example['loss_mask'].sum())} learned, "
              f"{len(example.get('images', ()))} images")
        print(terminal_text(token_spans(tokenizer, example), color))
    print("=== the trainer's first batch")
    if batch is None:
        print(f"(none: {inspection.stopped or 'the data ends before one'})")
    else:
        print("\n".join(batch_layout(batch)))
        for row in range(min(num_rows, _num_rows(batch))):
            print(f"--- row {row}")
            if "text_ids" in batch:
                print(tokenizer.decode(batch["text_ids"][row]))
                continue
            for number, spans in enumerate(row_segments(tokenizer, batch, row), 1):
                print(f"#{number}: {terminal_text(spans, color)}")
    print(f"skip counts so far: {inspection.skip_counts}")


def write_html(path: str, inspection: Inspection, num_rows: int) -> None:
    tokenizer, batch = inspection.tokenizer, inspection.batch
    cards = []
    for record in inspection.examples:
        title = html.escape(str(record["id"]))
        if "skipped" in record:
            cards.append(f"<div class=card><h3>{title}</h3><p class=skip>skipped: "
                         f"{html.escape(record['skipped'])}</p></div>")
            continue
        example = record["example"]
        if "text_ids" in example:
            text = html.escape(str(example["text_ids"].tolist()))
            counts = f"{len(example['text_ids'])} text ids"
        else:
            text = "".join(_html_span(span) for span in token_spans(tokenizer, example))
            counts = (f"{len(example['input_ids'])} tokens, {int(example['loss_mask'].sum())} "
                      "learned")
        cards.append(_card(title, example.get("images", ()), counts, text))
    layout = batch_layout(batch) if batch is not None else [inspection.stopped or "(no batch)"]
    rows = []
    for row in range(min(num_rows, 0 if batch is None else _num_rows(batch))):
        if "text_ids" in batch:
            text = html.escape(tokenizer.decode(batch["text_ids"][row]))
        else:
            text = "\n".join(f"#{number}: " + "".join(_html_span(span) for span in spans)
                             for number, spans in enumerate(row_segments(tokenizer, batch, row), 1))
        rows.append(_card(f"row {row}", row_images(batch, row), html.escape(layout[row]), text))
    style = ("body{font-family:sans-serif}.card{border:1px solid #ccc;margin:8px;padding:8px}"
             "img{width:160px;image-rendering:pixelated;margin:2px}pre{white-space:pre-wrap}"
             "mark.learned{background:#bfb}span.image{color:#07a;font-weight:bold}"
             ".skip{color:#a00}")
    with open(path, "w") as f:
        f.write(f"<!doctype html><html><head><meta charset=utf-8>{HTML_GENERATOR}<title>inspect-data</title>"
                f"<style>{style}</style></head><body><h2>inspect-data</h2>"
                f"<p>{html.escape(describe(inspection))}</p>"
                f"<p>Learned tokens: <mark class=learned>marked</mark></p>"
                f"<h3>first examples, in source order</h3>{''.join(cards)}"
                f"<h3>the trainer's first batch: batch layout</h3>"
                f"<pre>{html.escape(chr(10).join(layout))}</pre>{''.join(rows)}"
                f"<p>skip counts so far: {html.escape(str(inspection.skip_counts))}</p>"
                "</body></html>")


def _num_rows(batch: Mapping[str, np.ndarray]) -> int:
    return len(batch["text_ids" if "text_ids" in batch else "input_ids"])


def _card(title: str, images: Sequence[np.ndarray], counts: str, text: str) -> str:
    pictures = "".join(f"<img src='data:image/png;base64,{_png_base64(image)}'>"
                       for image in images)
    return (f"<div class=card><h3>{title}</h3><div class=imgs>{pictures}</div>"
            f"<p class=counts>{counts}</p><pre>{text}</pre></div>")


def _html_span(span: Span) -> str:
    text = html.escape(span.text)
    if span.is_image:
        return f"<span class=image>{text}</span>"
    return f"<mark class=learned>{text}</mark>" if span.learned else text


def _png_base64(image: np.ndarray) -> str:
    """A resized u8[S, S, 3] image (what the pipeline hands the model) as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


