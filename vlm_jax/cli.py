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


def _export_hf(args: argparse.Namespace) -> int:
    from vlm_jax.convert.exporter import ExportMismatch, describe, export_hf
    try:
        result = export_hf(args.checkpoint, args.out, dtype=args.dtype, part=args.part,
                           overwrite=args.overwrite)
    except ExportMismatch as e:
        print(f"vlm-jax export-hf: self-check FAILED: {e}; nothing was written to {args.out}",
              file=sys.stderr)
        return 3
    print(describe(result))
    return 0


# Subcommands that own their argument parsing: name -> (module with `main(argv) -> int`, help).
MODULE_COMMANDS = {
    "inspect-data": ("vlm_jax.data.inspect", "show examples as the model sees them"),
    "eval": ("vlm_jax.evaluate", "score a checkpoint: VQA, captioning, grounding, retrieval"),
    "sweep": ("vlm_jax.sweep", "expand a config's sweep() into runs, launch them, report"),
    "plan": ("vlm_jax.plan", "fit check: compile the train step for a device mesh, report memory"),
}


def _run_module_command(name: str, argv: list[str]) -> int:
    import importlib
    module = importlib.import_module(MODULE_COMMANDS[name][0])
    return module.main(argv) or 0


def _train(argv: list[str]) -> int:
    """`vlm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...] --workdir DIR`."""
    parser = argparse.ArgumentParser(prog="vlm-jax train", description=_train.__doc__)
    parser.add_argument("--config", required=True,
                        help="config file and its argument, e.g. configs/tiny.py:phase=align")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the final model")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config as JSON and exit (nothing compiles)")
    group = parser.add_argument_group(
        "multi-process", "one process per host; without these flags a TPU VM slice or a SLURM "
        "step is detected by itself, anything else runs as one process (vlm_jax/distributed.py)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0, e.g. 10.0.0.2:8476")
    group.add_argument("--num-processes", type=int, help="number of processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    args, rest = parser.parse_known_args(argv)
    overrides = _config_overrides(rest, parser)
    from vlm_jax import distributed  # before anything else touches JAX
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
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
    if jax.process_index() != 0:  # process 0 reports for the run
        return 0
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


# Chat template per decoder family when --template is not given (LLaVA-1.5 used vicuna on Llama).
DEFAULT_TEMPLATES = {"llama": "vicuna", "qwen2": "qwen2", "gemma": "gemma"}


def _load_for_generation(args: argparse.Namespace):
    import vlm_jax
    from vlm_jax import model_dir
    from vlm_jax.checkpoint import resolve_model_dir
    try:
        source = resolve_model_dir(args.checkpoint)
    except ValueError as e:
        raise ValueError(f"--checkpoint {e}") from None
    model = vlm_jax.load(source, dtype=args.dtype)
    note = model_dir.compute_note(source, args.dtype)
    if note:
        print(note, file=sys.stderr)
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer/ directory; generation needs one")
    if model.config.vision is None or model.config.llm is None:
        raise ValueError(f"{args.checkpoint} is not a vision-language model (needs a vision tower, "
                         f"a projector and an LLM); `generate`/`score` take image + prompt")
    # The template the model was trained with, else (an import) its family's usual one.
    template = args.template or model.template or DEFAULT_TEMPLATES[model.config.llm.family]
    return model, template


def _request_inputs(model, template: str, image_path: str, prompt: str):
    """(prompt ids i32[T], image f32[1, S, S, 3]) for one request, preprocessed as in training."""
    from vlm_jax.data.images import decode_image, preprocess_image
    from vlm_jax.evaluate import prompt_ids
    with open(image_path, "rb") as f:
        rgb = decode_image(f.read())
    image = preprocess_image(rgb, model.config.vision.image_size,
                             pad_to_square=model.pad_to_square)[None]
    return prompt_ids(model.tokenizer, prompt, template, model.config.tokens_per_image), image


def _generate(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from vlm_jax.generate import Sampling, generate, stop_token_ids, trim_at_stop_strings
    if (args.requests is None) == (args.prompt is None):
        raise ValueError("give either --prompt (with --image) or --requests FILE.jsonl")
    if args.requests is not None:
        with open(args.requests) as f:
            requests = [json.loads(line) for line in f if line.strip()]
        for number, request in enumerate(requests, 1):
            if not {"image", "prompt"} <= set(request):
                raise ValueError(f"{args.requests} line {number}: a request needs 'image' and "
                                 f"'prompt', got keys {sorted(request)}")
    else:
        if args.image is None:
            raise ValueError("--prompt needs --image")
        requests = [{"image": args.image, "prompt": args.prompt}]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model, template = _load_for_generation(args)
    tokenizer = model.tokenizer
    stop_ids = stop_token_ids(tokenizer, template)
    stop_sequences = [tokenizer.encode(s) for s in args.stop]
    for start in range(0, len(requests), args.batch_size):
        chunk = requests[start:start + args.batch_size]
        inputs = [_request_inputs(model, template, r["image"], r["prompt"]) for r in chunk]
        # Widths rounded up to 32 tokens: fewer distinct shapes, fewer compiles.
        width = -(-max(len(ids) for ids, _ in inputs) // 32) * 32
        input_ids = np.zeros((len(chunk), width), np.int32)
        for row, (ids, _) in enumerate(inputs):
            input_ids[row, :len(ids)] = ids
        tokens, lengths = generate(
            model.config, model.params, input_ids, np.array([len(ids) for ids, _ in inputs]),
            np.stack([image for _, image in inputs]), args.max_new_tokens, sampling, stop_ids,
            stop_sequences)
        for row, request in enumerate(chunk):
            ids = tokens[row, :lengths[row]].tolist()
            text = trim_at_stop_strings(tokenizer.decode(ids), args.stop)
            print(json.dumps({"prompt": request["prompt"], "image": request["image"],
                              "completion": text, "tokens": ids}), flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    import json

    from vlm_jax.generate import score
    model, template = _load_for_generation(args)
    prompt, image = _request_inputs(model, template, args.image, args.prompt)
    completion = model.tokenizer.encode(args.completion)
    if not completion:
        raise ValueError("--completion encodes to no tokens")
    logprobs = score(model.config, model.params, prompt.tolist(), completion, image[None])
    print(json.dumps({"tokens": completion,
                      "pieces": [model.tokenizer.decode([i], skip_special_tokens=False)
                                 for i in completion],
                      "logprobs": [float(x) for x in logprobs],
                      "total": float(logprobs.sum())}))
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from vlm_jax.data.templates import TEMPLATES
    p.add_argument("--checkpoint", required=True, help="model directory (import-hf or training)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="chat template; default: the one the model was trained with, else per "
                        "LLM family " + str(DEFAULT_TEMPLATES))
    add_dtype_arg(p)


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype: how the model computes here (a run setting, not stored with the model)."""
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (default float32; a model's training dtype is not reused)")


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

    p = sub.add_parser("export-hf", help="write a model as a HF transformers directory (LLaVA or "
                                         "SiglipVisionModel) and check it against ours")
    p.add_argument("--checkpoint", required=True, help="model directory or finished workdir")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written weights")
    p.add_argument("--part", default="llava", choices=("llava", "vision"),
                   help="llava: the whole VLM; vision: the encoder alone as SiglipVisionModel")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (only once the new export passed its check)")
    p.set_defaults(func=_export_hf)

    p = sub.add_parser("generate", help="answer prompts about images (KV-cache decoding)")
    _add_generation_args(p)
    p.add_argument("--image", help="image file (with --prompt)")
    p.add_argument("--prompt", help="the user's message")
    p.add_argument("--requests", help="JSONL file of {\"image\": PATH, \"prompt\": TEXT}, batched")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); EOS always stops")
    p.set_defaults(func=_generate)

    p = sub.add_parser("score", help="per-token log-probabilities of a completion, as JSON")
    _add_generation_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--completion", required=True, help="the answer to score")
    p.set_defaults(func=_score)

    sub.add_parser("train", add_help=False,
                   help="train per a config file (see `vlm-jax train --help`)")
    for name, (_, help_text) in MODULE_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=f"{help_text} (see `vlm-jax {name} --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MODULE_COMMANDS:
        return _run_module_command(argv[0], argv[1:])
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
