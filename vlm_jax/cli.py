"""The `vlm-jax` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import sys


def _import_hf(args: argparse.Namespace) -> int:
    from vlm_jax.convert.importer import import_hf
    config = import_hf(args.out, hf_dir=args.hf_dir, vision_dir=args.vision, text_dir=args.text,
                       projector=args.projector, feature_layer=args.feature_layer, seed=args.seed)
    parts = [p for p in ("vision", "text_tower", "projector", "llm") if getattr(config, p) is not None]
    print(f"wrote {args.out}: parts {', '.join(parts)}"
          + (f"; {config.tokens_per_image} image tokens per image, image token id "
             f"{config.image_token_id}" if config.projector is not None else ""))
    return 0


def _inspect_data(argv: list[str]) -> int:
    from vlm_jax.data import inspect
    return inspect.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-hf", help="convert HF checkpoints into a vlm_jax model directory")
    p.add_argument("--hf-dir", help="LLaVA (SigLIP), SiglipModel, SiglipVisionModel or Llama/Qwen2/Gemma dir")
    p.add_argument("--vision", help="SigLIP dir to compose with --text")
    p.add_argument("--text", help="LLM dir to compose with --vision")
    p.add_argument("--projector", default="mlp2x_gelu",
                   help="fresh projector when composing: linear | mlp2x_gelu | pixel_shuffle | resampler")
    p.add_argument("--feature-layer", type=int, default=None,
                   help="vision hidden state the projector reads (HF index; LLaVA-1.5 uses -2)")
    p.add_argument("--seed", type=int, default=0, help="init seed of new parameters")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=_import_hf)

    sub.add_parser("inspect-data", add_help=False,
                   help="show examples as the model sees them (see `vlm-jax inspect-data --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect-data":
        return _inspect_data(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
