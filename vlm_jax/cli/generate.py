"""`vlm-jax generate`: answer prompts about images (KV-cache decoding), one JSON line each.

Every flag, request and image is checked before the model loads, and every prompt's length
before anything compiles; a typed `<image>` places the image. Batches follow
`inference/batching.py` (one shape for the whole call: one compile)."""
from __future__ import annotations

import argparse
import json

from vlm_jax.cli.common import PROMPT_HELP, add_generation_args, load_for_generation
from vlm_jax.errors import InputError
from vlm_jax.inference.batching import batched_generate
from vlm_jax.inference.generate import Sampling
from vlm_jax.inference.prompts import stop_token_ids, trim_at_stop_strings
from vlm_jax.inference.requests import (Request, check_length, check_request, image_input,
                                        read_requests, request_prompt_ids)

HELP = "answer prompts about images (KV-cache decoding)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-jax generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--image", help="image file (with --prompt)")
    p.add_argument("--prompt", help=PROMPT_HELP)
    p.add_argument("--requests", help="JSONL file, one {\"image\": PATH, \"prompt\": TEXT} a line "
                                      "(prompts as --prompt), batched; all checked before loading")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (>= 1)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="at most this many new tokens (>= 1); prompt + these must fit the "
                        "model's max_position_embeddings")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help=">= 0; 0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); EOS always stops")
    return p


def check_generation_flags(args: argparse.Namespace) -> None:
    """Batching and sampling flags, before anything loads."""
    checks = (("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
              ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
              ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = no top-k cut)"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = no nucleus cut)"))
    for flag, value, ok, supported in checks:
        if not ok:
            raise InputError(f"{flag} {value}: supported: {supported}")
    if "" in args.stop:
        raise InputError("--stop '': an empty stop string would stop every request at once")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.requests is None) == (args.prompt is None):
        raise InputError("give either --prompt (with --image) or --requests FILE.jsonl")
    check_generation_flags(args)
    if args.requests is not None:
        if args.image is not None:
            raise InputError("--image goes with --prompt; with --requests each line names its image")
        requests = read_requests(args.requests)
    else:
        if args.image is None:
            raise InputError("--prompt needs --image")
        requests = [Request(args.image, args.prompt)]
    for request in requests:
        check_request(request)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model, template = load_for_generation(args)
    prompts = [request_prompt_ids(model, template, request) for request in requests]
    for request, ids in zip(requests, prompts):
        check_length(model, request, len(ids), args.max_new_tokens, "--max-new-tokens")
    tokenizer = model.tokenizer
    answers = batched_generate(
        model.config, model.params, prompts, [image_input(model, r) for r in requests],
        args.batch_size, args.max_new_tokens, sampling, stop_token_ids(tokenizer, template),
        [tokenizer.encode(s) for s in args.stop],
        # A prefix-LM model (PaliGemma, data.prefix_lm) saw its whole prompt bidirectionally.
        prefix_lengths=[len(ids) for ids in prompts] if model.prefix_lm else None)
    for request, ids in zip(requests, answers):
        text = trim_at_stop_strings(tokenizer.decode(ids), args.stop)
        print(json.dumps({"prompt": request.prompt, "image": request.image,
                          "completion": text, "tokens": ids}), flush=True)
    return 0
