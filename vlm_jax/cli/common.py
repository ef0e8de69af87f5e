"""What several commands share: `--config.a.b=V` overrides, `--dtype`, and loading a model
directory for generate / score (its chat template chosen and any disagreement printed)."""
from __future__ import annotations

import argparse
import sys

from vlm_jax import api, model_dir
from vlm_jax.data.templates import TEMPLATES
from vlm_jax.errors import CheckpointError
from vlm_jax.inference.prompts import family_template

PROMPT_HELP = ("the user's message. The template puts the image before it, as in training; a "
               "typed <image> (as in LLaVA prompts) places the image there instead, so at most one")


def config_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
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


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype: how the model computes here (a run setting, not stored with the model)."""
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (default float32; a model's training dtype is not reused)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model directory (import-hf or training)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="chat template; default: the one the model was trained with, else per "
                        "LLM family (models/families/)")
    add_dtype_arg(p)


def load_for_generation(args: argparse.Namespace):
    """(LoadedModel, template) for generate / score: the template the model was trained with,
    else (an import) its family's usual one; an override that differs is printed."""
    source = model_dir.resolve_model_dir(args.checkpoint, "--checkpoint")
    model = api.load(source, dtype=args.dtype)
    note = model_dir.compute_note(source, args.dtype)
    if note:
        print(note, file=sys.stderr)
    if model.tokenizer is None:
        raise CheckpointError(f"--checkpoint {args.checkpoint} has no tokenizer/ directory; "
                              f"generation needs one")
    if model.config.vision is None or model.config.llm is None:
        raise CheckpointError(f"--checkpoint {args.checkpoint} is not a vision-language model "
                              f"(needs a vision tower, a projector and an LLM); `generate`/`score` "
                              f"take image + prompt")
    family = model.config.llm.family
    template = args.template or model.template or family_template(family)
    if args.template and model.template and args.template != model.template:
        print(f"note: --template {args.template} differs from {model.template}, the template "
              f"{args.checkpoint} was trained with", file=sys.stderr)
    elif not args.template and not model.template:
        print(f"note: {args.checkpoint} records no chat template (an import); using {template}, "
              f"the {family} default (--template to choose)", file=sys.stderr)
    return model, template
