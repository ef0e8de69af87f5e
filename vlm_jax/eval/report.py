"""The HTML page of a `vlm-jax eval` run: metrics, the per-type table, and examples side by side.

One self-contained file (images inline as base64 PNG, no scripts, no external assets) that opens
in any browser or in a notebook's HTML viewer:

    write_report(path, title="vqa: runs/shapes/instruct", metrics={"accuracy": 0.61},
                 table="question type ...", rows=[ReportRow(...), ...])

Each row shows an image, the question (if any), the reference, the prediction and whether the
prediction was scored right (green) or wrong (red); captions show their own score instead.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

THUMBNAIL = 160  # px, the longer side as displayed


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One prediction. image: u8[H, W, 3] or None; correct: None when not right/wrong scored."""
    image: np.ndarray | None
    question: str
    reference: str
    prediction: str
    correct: bool | None = None
    note: str = ""          # e.g. the question type, or "CIDEr-D 4.2"


def png_data_uri(image: np.ndarray, max_side: int = 2 * THUMBNAIL) -> str:
    """u8[H, W, 3] -> "data:image/png;base64,..." (shrunk to max_side; small images stay small,
    the page scales them up without smoothing)."""
    picture = Image.fromarray(np.asarray(image, np.uint8))
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
img { width: %dpx; image-rendering: pixelated; }
tr.right { background: #e8f6e8; } tr.wrong { background: #fbe9e9; }
pre { background: #f6f6f6; padding: 8px; }
""" % THUMBNAIL


def render_report(title: str, metrics: Mapping[str, float | int | str], table: str,
                  rows: Sequence[ReportRow]) -> str:
    """The page as a string."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           "<table>"]
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        out.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(shown)}</td></tr>")
    out.append("</table>")
    if table:
        out.append(f"<pre>{html.escape(table)}</pre>")
    out.append(f"<h2>{len(rows)} examples</h2><table><tr><th>image</th><th>question</th>"
               "<th>reference</th><th>prediction</th><th></th></tr>")
    uris: dict[int, str] = {}  # one encoding per image object (many questions share an image)
    for row in rows:
        image_cell = ""
        if row.image is not None:
            uri = uris.setdefault(id(row.image), png_data_uri(row.image))
            image_cell = f"<img src='{uri}'>"
        if row.correct is None:
            css, mark = "", ""
        else:
            css, mark = ("right", "&#10004; right") if row.correct else ("wrong", "&#10008; wrong")
        note = f"<br><small>{html.escape(row.note)}</small>" if row.note else ""
        out.append(f"<tr class='{css}'><td>{image_cell}</td><td>{html.escape(row.question)}</td>"
                   f"<td>{html.escape(row.reference)}</td><td>{html.escape(row.prediction)}</td>"
                   f"<td>{mark}{note}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def write_report(path: str, title: str, metrics: Mapping[str, float | int | str], table: str,
                 rows: Sequence[ReportRow]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_report(title, metrics, table, rows))
