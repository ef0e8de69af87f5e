"""The `documents` world: procedural pages of small text, with questions that need reading it;
deterministic from (seed, split, index), no files. What tiling (data/tiling.py) is for.

A page (white, `image_size` px square) holds, from the top:
  * a title: one word of TITLES;
  * 1-3 labelled fields, one per line, "label: value", labels from LABELS (distinct on a
    page), values integers 0-99;
  * a table of 2-3 rows x 2-3 columns of words from WORDS, with rules between rows.
drawn in PIL's built-in font (Aileron, `font_size` px; the page's layout scales with it).
Questions (`question_types`), each answer short and canonical:
    title     "what is the title?"                           -> the title word
    field     "what is the value of total?"                  -> "42"
    cell      "what word is in row 2, column 3?"             -> the word
    grounding "give the box of the total field"              -> "[x0, y0, x1, y1]", 0-1000
Held-out layouts: every page draws its block offsets, column widths and field order from a
layout index; train uses layout indices whose residue mod 5 is 0-3, validation and test those
with residue 4, so test pages are laid out in ways no training page was.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.errors import ConfigError

TITLES = ("invoice", "receipt", "report", "order", "ledger", "summary", "budget", "memo")
LABELS = ("total", "count", "price", "year", "code", "items")
WORDS = ("bird", "cake", "coin", "desk", "door", "fish", "frog", "gold", "kite", "lamp", "leaf",
         "milk", "moon", "rock", "ship", "tree")  # four letters: three columns fit a small page
QUESTION_TYPES = ("title", "field", "cell", "grounding")
SPLITS = ("train", "validation", "test")
_SPLIT_OFFSET = {"train": 0, "validation": 2**31, "test": 2**31 + 2**24}
_SPLIT_SIZE = {"train": 2**31, "validation": 2000, "test": 2000}
_HELD_OUT_RESIDUE = 4  # layout index mod 5: validation / test only
_MAX_LINES = 7         # title + 3 fields + 3 table rows


def _line_height(font_size: int) -> int:
    return int(round(font_size * 1.3))


def _column_width(font_size: int) -> int:
    """The narrowest table column: the widest word and a 3 px gap."""
    return max(_font(font_size).getbbox(word)[2] for word in WORDS) + 3


@dataclasses.dataclass(frozen=True)
class Field:
    label: str
    value: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1] page coordinates


@dataclasses.dataclass(frozen=True)
class Page:
    title: str
    fields: tuple[Field, ...]
    table: tuple[tuple[str, ...], ...]       # rows of words
    layout: int                              # the layout index (held out by split)
    geometry: dict = dataclasses.field(compare=False, repr=False)  # pixel positions (`render`)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def vocabulary() -> list[str]:
    """Every word the world's texts use (captions, questions, answers), sorted."""
    words = set("what is the title value of word in row column give box field".split())
    words |= set(TITLES) | set(LABELS) | set(WORDS) | {str(n) for n in range(1001)}
    return sorted(words | set(",?:[]"))


class DocumentsSource:
    """Random access over the documents world: `len(source)`, `source[i] -> raw example`
    (an image and `turns_per_example` Q/A turns of the chosen question types)."""

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 96,
                 font_size: int = 9, turns_per_example: int = 3,
                 question_types: tuple[str, ...] = QUESTION_TYPES,
                 num_examples: int | None = None):
        if split not in SPLITS:
            raise ConfigError(f"documents: split={split!r}; supported: {SPLITS}")
        for question_type in question_types:
            if question_type not in QUESTION_TYPES:
                raise ConfigError(f"documents: question type {question_type!r}; supported: "
                                  f"{QUESTION_TYPES}")
        if not question_types or turns_per_example < 1:
            raise ConfigError("documents: turns_per_example >= 1 and some question_types")
        if font_size < 6 or image_size < max(_MAX_LINES * _line_height(font_size),
                                             3 * _column_width(font_size)) + 4:
            need = max(_MAX_LINES * _line_height(font_size), 3 * _column_width(font_size)) + 4
            raise ConfigError(f"documents: image_size={image_size} cannot hold a page of "
                              f"{_MAX_LINES} lines and 3 table columns at font_size={font_size} "
                              f"(needs >= {need} px; font_size >= 6)")
        self.split, self.seed, self.image_size, self.font_size = split, seed, image_size, font_size
        self.turns_per_example, self.question_types = turns_per_example, tuple(question_types)
        self.num_examples = _SPLIT_SIZE[split] if num_examples is None else num_examples
        if not 0 < self.num_examples <= _SPLIT_SIZE[split]:
            raise ConfigError(f"documents: num_examples must be in [1, {_SPLIT_SIZE[split]}]")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"documents {self.split}: index {index} outside [0, {self.num_examples})")
        page, turns = self.sample(index)
        conversation = []
        for i, (_, question, answer) in enumerate(turns):
            conversation.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + question})
            conversation.append({"role": "assistant", "content": answer})
        meta = {"source": "documents", "split": self.split, "index": index,
                "question_types": [t for t, _, _ in turns], "answers": [a for _, _, a in turns],
                "layout": page.layout}
        return {"id": f"documents:{self.split}:{self.seed}:{index}",
                "images": [self.render(page)], "conversation": conversation, "caption": None,
                "meta": meta}

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + index])

    def sample(self, index: int) -> tuple[Page, list[tuple[str, str, str]]]:
        """(the page, [(question type, question, answer)]) of example `index`."""
        rng = self._rng(index)
        residue = _HELD_OUT_RESIDUE if self.split != "train" else int(rng.integers(0, 4))
        layout = 5 * int(rng.integers(0, 10**6)) + residue
        page = self._page(rng, layout)
        turns, asked = [], set()
        for _ in range(self.turns_per_example):
            # A question asked twice about one page teaches nothing (its answer is in the
            # context): a page with fewer distinct questions gets fewer turns.
            for _ in range(8):
                kind = self.question_types[int(rng.integers(len(self.question_types)))]
                question, answer = _ask(kind, page, rng)
                if question not in asked:
                    break
            else:
                break
            asked.add(question)
            turns.append((kind, question, answer))
        return page, turns

    def _page(self, rng: np.random.Generator, layout: int) -> Page:
        """Content from `rng`, geometry from the layout index (drawn by `render`)."""
        title = TITLES[int(rng.integers(len(TITLES)))]
        num_fields = int(rng.integers(1, 4))
        labels = rng.choice(len(LABELS), num_fields, replace=False)
        values = rng.integers(0, 100, num_fields)
        rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
        table = tuple(tuple(WORDS[int(w)] for w in rng.integers(0, len(WORDS), cols))
                      for _ in range(rows))
        geometry = self._geometry(layout, [LABELS[int(i)] for i in labels], values, rows, cols)
        fields = tuple(Field(LABELS[int(i)], int(v), box)
                       for i, v, box in zip(labels, values, geometry["field_boxes"]))
        return Page(title, fields, table, layout, geometry)

    def _geometry(self, layout: int, labels, values, rows: int, cols: int) -> dict:
        """Pixel positions of every block for a layout index (deterministic): margins, the
        title's indent, the gaps between blocks and the indents of fields and table; the page's
        free height is shared between the gaps, so nothing leaves the page."""
        g = np.random.default_rng([7919, layout])
        size, line = self.image_size, _line_height(self.font_size)
        free = size - 4 - line * (1 + len(labels) + rows)
        font = _font(self.font_size)
        col_width = _column_width(self.font_size)
        free_x = size - 4 - cols * col_width
        margin = 2 + int(g.integers(0, max(1, min(size // 12, free // 3, free_x // 2) + 1)))
        gap_title, gap_table = (int(v) for v in g.integers(0, max(1, (free - margin) // 2 + 1), 2))
        y = margin
        title_at = (margin + int(g.integers(0, max(1, size // 4))), y)
        y += line + gap_title
        field_x = margin + int(g.integers(0, max(1, size // 6)))
        field_lines, field_boxes = [], []
        for label, value in zip(labels, values):
            text = f"{label}: {int(value)}"
            x0, y0, x1, y1 = font.getbbox(text)
            field_lines.append(((field_x, y), text))
            field_boxes.append(((field_x + x0) / size, (y + y0) / size,
                                min(field_x + x1, size) / size, min(y + y1, size) / size))
            y += line
        y += gap_table
        slack = size - 2 * margin - cols * col_width
        table_x = margin + int(g.integers(0, max(1, min(slack, size // 10) + 1)))
        col_width += max(0, slack - (table_x - margin)) // (2 * cols)
        return {"title_at": title_at, "field_lines": field_lines, "field_boxes": field_boxes,
                "table_at": (table_x, y), "col_width": col_width, "line": line}

    def render(self, page: Page) -> np.ndarray:
        """u8[S, S, 3]: the page, black text on white."""
        size, geometry = self.image_size, page.geometry
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        font = _font(self.font_size)
        draw.text(geometry["title_at"], page.title, fill=(0, 0, 0), font=font)
        for at, text in geometry["field_lines"]:
            draw.text(at, text, fill=(0, 0, 0), font=font)
        x, y = geometry["table_at"]
        line, width = geometry["line"], geometry["col_width"]
        for r, row in enumerate(page.table):
            top = y + r * line
            draw.line((x, top, x + width * len(row), top), fill=(150, 150, 150))
            for c, word in enumerate(row):
                draw.text((x + c * width + 1, top + 1), word, fill=(0, 0, 0), font=font)
        return np.asarray(image, dtype=np.uint8).copy()


def _ask(kind: str, page: Page, rng: np.random.Generator) -> tuple[str, str]:
    if kind == "title":
        return "what is the title?", page.title
    if kind == "field":
        field = page.fields[int(rng.integers(len(page.fields)))]
        return f"what is the value of {field.label}?", str(field.value)
    if kind == "cell":
        r, c = int(rng.integers(len(page.table))), int(rng.integers(len(page.table[0])))
        return f"what word is in row {r + 1}, column {c + 1}?", page.table[r][c]
    field = page.fields[int(rng.integers(len(page.fields)))]
    x0, y0, x1, y1 = (int(round(v * 1000)) for v in field.box)
    return f"give the box of the {field.label} field", f"[{x0}, {y0}, {x1}, {y1}]"
