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


def _train(argv: list[str]) -> int:
    """`vlm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...] --workdir DIR`."""
    parser = argparse.ArgumentParser(prog="vlm-jax train", description=_train.__doc__)
    parser.add_argument("--config", required=True,
                        help="config file and its argument, e.g. configs/tiny.py:phase=align")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the final model")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config as JSON and exit (nothing compiles)")
    args, rest = parser.parse_known_args(argv)
    overrides = _config_overrides(rest, parser)
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags
        flags.FLAGS.mark_as_parsed()
    import jax
    from vlm_jax import config as config_lib
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    run = config_lib.build_run_config(config, jax.device_count(), jax.process_count())
    if args.print_config:
        import json
        print(json.dumps(run.to_dict(), indent=2))
        return 0
    from vlm_jax.train.loop import TrainingStopped, train
    try:
        metrics = train(run, args.workdir)
    except TrainingStopped as e:
        print(f"vlm-jax train: stopped: {e}", file=sys.stderr)
        return 3
    shown = {k: v for k, v in metrics.items() if not k.startswith("data/")}
    print("vlm-jax train: " + ("preempted" if metrics["preempted"] else "done") + " "
          + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in shown.items()))
    return 0


def _config_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--config.a.b=V` / `--config.a.b V` -> ["a.b=V", ...]; anything else is an error."""
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognized argument {arg!r} (overrides look like --config.a.b=VALUE)")
        key, sep, value = arg[len("--config."):].partition("=")
        if not sep:
            if i + 1 >= len(rest):
                parser.error(f"{arg} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append(f"{key}={value}")
        i += 1
    return overrides


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

    sub.add_parser("train", add_help=False,
                   help="train per a config file (see `vlm-jax train --help`)")
    sub.add_parser("inspect-data", add_help=False,
                   help="show examples as the model sees them (see `vlm-jax inspect-data --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect-data":
        return _inspect_data(argv[1:])
    if argv and argv[0] == "train":
        try:
            return _train(argv[1:])
        except (ValueError, FileNotFoundError) as e:
            print(f"vlm-jax train: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
