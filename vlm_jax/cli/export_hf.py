"""`vlm-jax export-hf`: a model directory (or finished workdir) -> a HF transformers directory
(LLaVA, a self-contained remote-code model for every other composition, or the encoder alone as
SiglipVisionModel), loaded back in transformers and checked against ours before it is moved into
place: a failed check writes nothing (exit 3)."""
from __future__ import annotations

import argparse

from vlm_jax.convert.exporter import FORMATS, PARTS, describe, export_hf
from vlm_jax.errors import ExportMismatch

HELP = ("write a model as a HF transformers directory (LLaVA, custom remote code or "
        "SiglipVisionModel) and check it against ours")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-jax export-hf", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory or finished workdir")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written weights")
    p.add_argument("--part", default="vlm", choices=PARTS,
                   help="vlm: the whole VLM (see --format); vision: the encoder alone as "
                        "SiglipVisionModel; llm: the decoder alone as its family's *ForCausalLM")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="--part vlm: llava = LlavaForConditionalGeneration (mlp2x_gelu projector "
                        "only); idefics3 = Idefics3ForConditionalGeneration (Idefics3 / SmolVLM: "
                        "pixel_shuffle, mlp_depth=1, bias=False, vision feature_post_norm, "
                        "llama); custom = remote code any composition fits (load with "
                        "trust_remote_code=True); auto = llava (or idefics3) where it fits, else "
                        "custom")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file (e.g. 5GB, 500MB, 2GiB); bigger weights are "
                        "written as shards with a model.safetensors.index.json (default 5GB, as "
                        "transformers' save_pretrained)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (only once the new export passed its check)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_hf(args.checkpoint, args.out, dtype=args.dtype, part=args.part,
                           overwrite=args.overwrite, format=args.format,
                           max_shard_size=args.max_shard_size)
    except ExportMismatch as e:
        raise ExportMismatch(f"{e}; nothing was written to {args.out}") from None
    print(describe(result))
    return 0
