"""`vlm-jax score`: per-token log-probabilities of a completion, as one JSON object.

The request is checked before the model loads, its length before anything compiles; a typed
`<image>` places the image."""
from __future__ import annotations

import argparse
import json

from vlm_jax.cli.common import PROMPT_HELP, add_generation_args, load_for_generation
from vlm_jax.errors import InputError
from vlm_jax.inference.generate import score
from vlm_jax.inference.requests import (Request, check_length, check_request, image_input,
                                        request_prompt_ids)

HELP = "per-token log-probabilities of a completion, as JSON"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-jax score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help=PROMPT_HELP)
    p.add_argument("--completion", required=True, help="the answer to score")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    request = Request(args.image, args.prompt)
    check_request(request)
    model, template = load_for_generation(args)
    prompt = request_prompt_ids(model, template, request)
    completion = model.tokenizer.encode(args.completion)
    if not completion:
        raise InputError("--completion encodes to no tokens")
    check_length(model, request, len(prompt), len(completion), "--completion's tokens")
    logprobs = score(model.config, model.params, prompt.tolist(), completion,
                     image_input(model, request)[None], prefix_lm=model.prefix_lm)
    print(json.dumps({"tokens": completion,
                      "pieces": [model.tokenizer.decode([i], skip_special_tokens=False)
                                 for i in completion],
                      "logprobs": [float(x) for x in logprobs],
                      "total": float(logprobs.sum())}))
    return 0
