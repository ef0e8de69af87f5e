"""`vlm-jax inspect-data`: show training examples exactly as the model sees them.

For N examples: the tokenized text with the learned (loss-masked) part marked, image token spans
shown compactly as `<image x196>`, token counts and skip reasons; then the packing layout of
one batch (segments and their lengths per row). Writes an HTML contact sheet (each example's
preprocessed images as inline PNGs next to its text) to --out.

    vlm-jax inspect-data --config configs/shapes/instruct.py --out /tmp/data.html
    vlm-jax inspect-data --source llava_json --path data/llava.json --tokenizer tok/ \\
        --template vicuna --num-image-tokens 576 --seq-len 2048 --out /tmp/llava.html
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import importlib.util
import io
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from vlm_jax.config_utils import from_dict
from vlm_jax.data import pipeline
from vlm_jax.data.errors import SkipExample
from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer, train_word_tokenizer
from vlm_jax.data.transforms import make_transform

ANSI_LEARNED, ANSI_IMAGE, ANSI_RESET = "\033[32m", "\033[36m", "\033[0m"


@dataclasses.dataclass
class Span:
    """A run of tokens shown together: text, an image run, learned or not."""
    text: str
    num_tokens: int
    learned: bool
    is_image: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlm-jax inspect-data", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="python config file whose get_config() has a .data field")
    parser.add_argument("--source", choices=("shapes", "llava_json"),
                        help="direct mode: the source kind (instead of --config)")
    parser.add_argument("--path", help="llava_json: the JSON / JSONL file")
    parser.add_argument("--image-root", help="llava_json: image root (default: the JSON's folder)")
    parser.add_argument("--task", default="instruct", choices=pipeline.TASKS)
    parser.add_argument("--template", default=None, help="chat template (default: the config's; "
                        "vicuna in direct mode)")
    parser.add_argument("--tokenizer", help="tokenizer.json / .model / directory (shapes: "
                        "default is a tokenizer trained on the shapes corpus)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--num-image-tokens", type=int, default=None)
    parser.add_argument("--num-examples", "-n", type=int, default=4)
    parser.add_argument("--out", default="inspect_data.html", help="HTML contact sheet path")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return parser.parse_args(argv)


def data_config(args: argparse.Namespace) -> pipeline.DataConfig:
    """The DataConfig of --config (its .data), or one built from the direct flags."""
    if args.config:
        spec = importlib.util.spec_from_file_location("inspected_config", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        values = module.get_config().data
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    elif args.source == "shapes":
        values = {"sources": [{"kind": "shapes", "options": {
            "task": {"align": "caption", "contrastive": "caption", "lm": "text"}.get(args.task, "qa"),
            "image_size": args.image_size or 224}}]}
    elif args.source == "llava_json":
        if not args.path:
            raise ValueError("--source llava_json needs --path")
        values = {"sources": [{"kind": "llava_json",
                               "options": {"path": args.path, "image_root": args.image_root}}],
                  "template": "vicuna"}
    else:
        raise ValueError("give --config FILE or --source shapes|llava_json")
    overrides = {"task": args.task if not args.config else None, "template": args.template,
                 "seq_len": args.seq_len, "image_size": args.image_size,
                 "num_image_tokens": args.num_image_tokens}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(shuffle=False, num_epochs=1, worker_count=0, read_threads=0,
                  max_skip_fraction=1.0)
    return from_dict(pipeline.DataConfig, values, "data")


def load_tokenizer(args: argparse.Namespace, cfg: pipeline.DataConfig) -> Tokenizer:
    """--tokenizer, else (shapes only) one trained on the shapes corpus; `<image>` and the
    template's special tokens are added where missing, as the trainer does."""
    template_tokens = get_template(cfg.template).special_tokens
    if args.tokenizer:
        tokenizer = Tokenizer.from_path(args.tokenizer)
    elif all(s.kind == "shapes" for s in cfg.sources):
        from vlm_jax.data.sources.shapes import corpus
        tokenizer = train_word_tokenizer(corpus(500), special_tokens=template_tokens)
    else:
        raise ValueError("--tokenizer is required unless every source is shapes")
    tokenizer.add_special_tokens([tokenizer.image_token, *template_tokens])
    return tokenizer


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


def inspect_examples(cfg: pipeline.DataConfig, tokenizer: Tokenizer, num_examples: int
                     ) -> list[dict[str, Any]]:
    """The first `num_examples` raw examples of the first source, each transformed (or the reason
    it was skipped), in source order."""
    source = pipeline.make_source(cfg.sources[0])
    transform = make_transform(cfg, tokenizer)
    results = []
    for index in range(min(num_examples, len(source))):
        record: dict[str, Any] = {"index": index, "id": f"index {index}"}
        try:
            raw = source[index]
            record["id"] = raw["id"]
            record["example"] = transform(raw)
        except SkipExample as skip:
            record["skipped"] = f"{skip.reason}: {skip.detail}"
        results.append(record)
    return results


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


class _FirstExamples:
    """The first `count` examples of a source (shapes' train split is effectively infinite)."""

    def __init__(self, source: Any, count: int):
        self.source = source
        self.count = min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        return self.source[index]


def first_batch(cfg: pipeline.DataConfig, tokenizer: Tokenizer, num_examples: int
                ) -> dict[str, np.ndarray] | None:
    """One batch of (at most) 2 rows built by the real pipeline from the first examples."""
    cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 2))
    sources = [(f"{s.kind}{i}", _FirstExamples(pipeline.make_source(s), num_examples), s.weight)
               for i, s in enumerate(cfg.sources)]
    batches = pipeline.build_pipeline_from(cfg, sources, make_transform(cfg, tokenizer),
                                           process_index=0, process_count=1)
    return next(batches, None)


def write_html(path: str, cfg: pipeline.DataConfig, results: Sequence[Mapping[str, Any]],
               spans_of: Mapping[int, list[Span]], layout: Sequence[str]) -> None:
    cards = []
    for record in results:
        title = html.escape(str(record["id"]))
        if "skipped" in record:
            cards.append(f"<div class=card><h3>{title}</h3><p class=skip>skipped: "
                         f"{html.escape(record['skipped'])}</p></div>")
            continue
        example = record["example"]
        images = "".join(f"<img src='data:image/png;base64,{_png_base64(image)}'>"
                         for image in example.get("images", ()))
        if "text_ids" in example:
            text = html.escape(str(example["text_ids"].tolist()))
            counts = f"{len(example['text_ids'])} text ids"
        else:
            text = "".join(_html_span(span) for span in spans_of[record["index"]])
            counts = (f"{len(example['input_ids'])} tokens, {int(example['loss_mask'].sum())} "
                      "learned")
        cards.append(f"<div class=card><h3>{title}</h3><div class=imgs>{images}</div>"
                     f"<p class=counts>{counts}</p><pre>{text}</pre></div>")
    style = ("body{font-family:sans-serif}.card{border:1px solid #ccc;margin:8px;padding:8px}"
             "img{width:160px;image-rendering:pixelated;margin:2px}pre{white-space:pre-wrap}"
             "mark.learned{background:#bfb}span.image{color:#07a;font-weight:bold}"
             ".skip{color:#a00}")
    summary = html.escape(f"task={cfg.task} template={cfg.template} seq_len={cfg.seq_len} "
                          f"image_size={cfg.image_size} num_image_tokens={cfg.num_image_tokens}")
    with open(path, "w") as f:
        f.write(f"<!doctype html><html><head><meta charset=utf-8><title>inspect-data</title>"
                f"<style>{style}</style></head><body><h2>inspect-data</h2><p>{summary}</p>"
                f"<p>Learned tokens: <mark class=learned>marked</mark></p>{''.join(cards)}"
                f"<h3>batch layout</h3><pre>{html.escape(chr(10).join(layout))}</pre>"
                "</body></html>")


def _html_span(span: Span) -> str:
    text = html.escape(span.text)
    if span.is_image:
        return f"<span class=image>{text}</span>"
    return f"<mark class=learned>{text}</mark>" if span.learned else text


def _png_base64(image: np.ndarray) -> str:
    """A preprocessed f32[S, S, 3] image in [-1, 1] as base64 PNG."""
    pixels = np.clip((np.asarray(image) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = data_config(args)
    tokenizer = load_tokenizer(args, cfg)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    results = inspect_examples(cfg, tokenizer, args.num_examples)
    spans_of = {}
    for record in results:
        print(f"--- {record['id']}")
        if "skipped" in record:
            print(f"skipped: {record['skipped']}")
            continue
        example = record["example"]
        if "text_ids" in example:
            print(f"text_ids ({len(example['text_ids'])}): {example['text_ids'].tolist()}")
            print(tokenizer.decode(example["text_ids"]))
            continue
        spans_of[record["index"]] = token_spans(tokenizer, example)
        print(f"{len(example['input_ids'])} tokens, {int(example['loss_mask'].sum())} learned, "
              f"{len(example.get('images', ()))} images")
        print(terminal_text(spans_of[record["index"]], color))
    batch = first_batch(cfg, tokenizer, max(args.num_examples, 8))
    layout = batch_layout(batch) if batch is not None else ["(no complete batch)"]
    print(f"--- batch layout (packing={cfg.packing}, seq_len={cfg.seq_len})")
    print("\n".join(layout))
    write_html(args.out, cfg, results, spans_of, layout)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
