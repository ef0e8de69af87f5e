"""`vlm-jax export-hf`: a model directory (or finished workdir) -> a HF transformers directory
(LLaVA, or the encoder alone as SiglipVisionModel), loaded back in transformers and checked
against ours before it is moved into place: a failed check writes nothing (exit 3)."""
from __future__ import annotations

import argparse

from vlm_jax.convert.exporter import describe, export_hf
from vlm_jax.errors import ExportMismatch

HELP = ("write a model as a HF transformers directory (LLaVA or SiglipVisionModel) and check it "
        "against ours")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-jax export-hf", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory or finished workdir")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written weights")
    p.add_argument("--part", default="llava", choices=("llava", "vision"),
                   help="llava: the whole VLM; vision: the encoder alone as SiglipVisionModel")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (only once the new export passed its check)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_hf(args.checkpoint, args.out, dtype=args.dtype, part=args.part,
                           overwrite=args.overwrite)
    except ExportMismatch as e:
        raise ExportMismatch(f"{e}; nothing was written to {args.out}") from None
    print(describe(result))
    return 0
