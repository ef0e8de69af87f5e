"""`vlm-jax import-hf`: HF checkpoints (LLaVA, SigLIP, Llama / Qwen2 / Gemma) -> a vlm_jax model
directory, written whole or not at all; a non-empty --out is refused unless --overwrite."""
from __future__ import annotations

import argparse

from vlm_jax.convert.importer import import_hf

HELP = "convert HF checkpoints into a vlm_jax model directory"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-jax import-hf", description=__doc__)
    p.add_argument("--hf-dir", help="LLaVA (SigLIP), SiglipModel, SiglipVisionModel or "
                                    "Llama/Qwen2/Gemma dir")
    p.add_argument("--vision", help="SigLIP dir to compose with --text")
    p.add_argument("--text", help="LLM dir to compose with --vision")
    p.add_argument("--projector", default="mlp2x_gelu",
                   help="fresh projector when composing: linear | mlp2x_gelu | pixel_shuffle | "
                        "resampler")
    p.add_argument("--feature-layer", type=int, default=None,
                   help="vision hidden state the projector reads (HF index; LLaVA-1.5 uses -2)")
    p.add_argument("--seed", type=int, default=0, help="init seed of new parameters")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (only once the new model is fully written)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = import_hf(args.out, hf_dir=args.hf_dir, vision_dir=args.vision, text_dir=args.text,
                       projector=args.projector, feature_layer=args.feature_layer, seed=args.seed,
                       overwrite=args.overwrite)
    parts = [p for p in ("vision", "text_tower", "projector", "llm") if getattr(config, p) is not None]
    print(f"wrote {args.out}: parts {', '.join(parts)}"
          + (f"; {config.tokens_per_image} image tokens per image, image token id "
             f"{config.image_token_id}" if config.projector is not None else ""))
    return 0
