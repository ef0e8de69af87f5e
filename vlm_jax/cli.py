"""The `vlm-jax` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple


def _import_hf(args: argparse.Namespace) -> int:
    from vlm_jax.convert.importer import import_hf
    config = import_hf(args.out, hf_dir=args.hf_dir, vision_dir=args.vision, text_dir=args.text,
                       projector=args.projector, feature_layer=args.feature_layer, seed=args.seed,
                       overwrite=args.overwrite)
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
    """`vlm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...] --workdir DIR`.

    Re-running the same command resumes from the workdir's latest checkpoint. Ctrl-C saves a
    checkpoint at the next step and exits with 130 (a second Ctrl-C exits at once, also 130);
    SIGTERM (preemption) saves the same way and exits with 0."""
    import inspect
    parser = argparse.ArgumentParser(prog="vlm-jax train",
                                     description=inspect.cleandoc(_train.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config file and its argument, e.g. configs/tiny.py:phase=align")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the final model")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config as JSON and exit (nothing compiles)")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="resume a checkpoint written under other train.steps / epochs / "
                             "train.optimizer schedule values (refused without this flag): go on "
                             "from its step under the config's values, the lr jumping to the new "
                             "schedule's value there")
    group = parser.add_argument_group(
        "multi-process", "one process per host; without these flags a TPU VM slice or a SLURM "
        "step is detected by itself, anything else runs as one process (vlm_jax/distributed.py)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0, e.g. 10.0.0.2:8476")
    group.add_argument("--num-processes", type=int, help="number of processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    args, rest = parser.parse_known_args(argv)
    overrides = _config_overrides(rest, parser)
    try:
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
            metrics = train(run, args.workdir, allow_schedule_change=args.allow_schedule_change)
        except TrainingStopped as e:
            print(f"vlm-jax train: stopped: {e}", file=sys.stderr)
            return 3
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run could save
        print(f"vlm-jax train: interrupted by Ctrl-C, nothing saved after the last checkpoint; "
              f"re-run the same command to resume from the latest one in {args.workdir}",
              file=sys.stderr)
        return 130
    by_ctrl_c = metrics.get("stopped_by") == "Ctrl-C"
    if jax.process_index() != 0:  # process 0 reports for the run
        return 130 if by_ctrl_c else 0
    if by_ctrl_c:
        print(f"vlm-jax train: stopped by Ctrl-C at step {metrics['step']}; checkpoint "
              f"{metrics['checkpoint']}; re-run the same command to resume", file=sys.stderr)
        return 130
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
    family = model.config.llm.family
    template = args.template or model.template or DEFAULT_TEMPLATES[family]
    if args.template and model.template and args.template != model.template:
        print(f"note: --template {args.template} differs from {model.template}, the template "
              f"{args.checkpoint} was trained with", file=sys.stderr)
    elif not args.template and not model.template:
        print(f"note: {args.checkpoint} records no chat template (an import); using {template}, "
              f"the {family} default (--template to choose)", file=sys.stderr)
    return model, template


PROMPT_HELP = ("the user's message. The template puts the image before it, as in training; a "
               "typed <image> (as in LLaVA prompts) places the image there instead, so at most one")

# JSON's names for what json.loads returns, for messages about a requests file.
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


class _Request(NamedTuple):
    """One image + prompt and where it was given: `source` "FILE line N", None for the flags."""
    image: str
    prompt: str
    source: str | None = None

    def prompt_label(self) -> str:
        if self.source is not None:
            return self.source
        start = self.prompt[:40]
        return f"--prompt {start!r}" + ("..." if len(self.prompt) > len(start) else "")

    def image_label(self) -> str:
        return f"--image {self.image}" if self.source is None else f"{self.source}: image {self.image}"


def _read_requests(path: str) -> list[_Request]:
    """The requests of a JSONL file, one object {"image": PATH, "prompt": TEXT} per non-blank
    line; anything else is an error naming the file and line."""
    import json
    requests = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--requests {path}: {getattr(e, 'strerror', None) or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path} line {number}"
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not JSON ({e.msg}); a request is "
                             f'{{"image": PATH, "prompt": TEXT}}') from None
        if not isinstance(request, dict):
            raise ValueError(f"{source}: a request is a JSON object "
                             f'{{"image": PATH, "prompt": TEXT}}, got {_JSON_TYPES[type(request)]}')
        if not {"image", "prompt"} <= set(request):
            raise ValueError(f"{source}: a request needs 'image' and 'prompt', got keys "
                             f"{sorted(request)}")
        for key in ("image", "prompt"):
            if not isinstance(request[key], str):
                raise ValueError(f"{source}: {key!r} must be a string, got "
                                 f"{_JSON_TYPES[type(request[key])]}")
        requests.append(_Request(request["image"], request["prompt"], source))
    if not requests:
        raise ValueError(f"--requests {path} holds no requests")
    return requests


def _check_request(request: _Request) -> None:
    """What can be checked without the model: the prompt's image placeholders and the image
    (decoded once here, so that no bad image stops a run halfway)."""
    from vlm_jax.data.tokenizer import IMAGE_TOKEN
    from vlm_jax.evaluate import user_content
    try:
        user_content(request.prompt, IMAGE_TOKEN)
    except ValueError as e:
        raise ValueError(f"{request.prompt_label()}: {e}") from None
    _read_image(request)


def _read_image(request: _Request):
    """u8[H, W, 3]: the request's image decoded; a missing or undecodable file is an error."""
    from vlm_jax.data.errors import SkipExample
    from vlm_jax.data.images import decode_image
    try:
        with open(request.image, "rb") as f:
            return decode_image(f.read())
    except OSError as e:
        raise ValueError(f"{request.image_label()}: {e.strerror or e}") from None
    except SkipExample as e:
        raise ValueError(f"{request.image_label()}: not a usable image ({e})") from None


def _prompt_ids(model, template: str, request: _Request):
    """i32[T]: the request's prompt as training saw it (template, image tokens expanded)."""
    from vlm_jax.evaluate import prompt_ids
    try:
        return prompt_ids(model.tokenizer, request.prompt, template, model.config.tokens_per_image)
    except ValueError as e:
        raise ValueError(f"{request.prompt_label()}: {e}") from None


def _check_length(model, request: _Request, prompt_length: int, more: int, what: str) -> None:
    """The prompt plus `more` tokens must fit the model's positions."""
    limit = model.config.llm.max_position_embeddings
    if prompt_length + more > limit:
        raise ValueError(f"{request.prompt_label()}: the prompt is {prompt_length} tokens (template "
                         f"and {model.config.tokens_per_image} image tokens included); with {what} "
                         f"{more} that is {prompt_length + more} > max_position_embeddings {limit} "
                         f"of the model")


def _request_inputs(model, template: str, image_path: str, prompt: str):
    """(prompt ids i32[T], image f32[1, S, S, 3]) for one request, preprocessed as in training."""
    request = _Request(image_path, prompt)
    return _prompt_ids(model, template, request), _image_input(model, request)


def _image_input(model, request: _Request):
    """f32[1, S, S, 3]: the request's image preprocessed as in training."""
    from vlm_jax.data.images import preprocess_image
    return preprocess_image(_read_image(request), model.config.vision.image_size,
                            pad_to_square=model.pad_to_square)[None]


def _check_generation_flags(args: argparse.Namespace) -> None:
    """Batching and sampling flags, before anything loads."""
    checks = (("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
              ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
              ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = no top-k cut)"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = no nucleus cut)"))
    for flag, value, ok, supported in checks:
        if not ok:
            raise ValueError(f"{flag} {value}: supported: {supported}")
    if "" in args.stop:
        raise ValueError("--stop '': an empty stop string would stop every request at once")


def _generate(args: argparse.Namespace) -> int:
    """`vlm-jax generate`: every flag, request and image is checked before the model loads, and
    every prompt's length before anything compiles; a typed `<image>` places the image."""
    import json

    import numpy as np

    from vlm_jax.generate import Sampling, generate, stop_token_ids, trim_at_stop_strings
    if (args.requests is None) == (args.prompt is None):
        raise ValueError("give either --prompt (with --image) or --requests FILE.jsonl")
    _check_generation_flags(args)
    if args.requests is not None:
        if args.image is not None:
            raise ValueError("--image goes with --prompt; with --requests each line names its image")
        requests = _read_requests(args.requests)
    else:
        if args.image is None:
            raise ValueError("--prompt needs --image")
        requests = [_Request(args.image, args.prompt)]
    for request in requests:
        _check_request(request)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model, template = _load_for_generation(args)
    prompts = [_prompt_ids(model, template, request) for request in requests]
    for request, ids in zip(requests, prompts):
        _check_length(model, request, len(ids), args.max_new_tokens, "--max-new-tokens")
    tokenizer = model.tokenizer
    stop_ids = stop_token_ids(tokenizer, template)
    stop_sequences = [tokenizer.encode(s) for s in args.stop]
    for start in range(0, len(requests), args.batch_size):
        chunk = requests[start:start + args.batch_size]
        chunk_ids = prompts[start:start + args.batch_size]
        # Widths rounded up to 32 tokens: fewer distinct shapes, fewer compiles.
        width = -(-max(len(ids) for ids in chunk_ids) // 32) * 32
        input_ids = np.zeros((len(chunk), width), np.int32)
        for row, ids in enumerate(chunk_ids):
            input_ids[row, :len(ids)] = ids
        tokens, lengths = generate(
            model.config, model.params, input_ids, np.array([len(ids) for ids in chunk_ids]),
            np.stack([_image_input(model, request) for request in chunk]), args.max_new_tokens,
            sampling, stop_ids, stop_sequences)
        for row, request in enumerate(chunk):
            ids = tokens[row, :lengths[row]].tolist()
            text = trim_at_stop_strings(tokenizer.decode(ids), args.stop)
            print(json.dumps({"prompt": request.prompt, "image": request.image,
                              "completion": text, "tokens": ids}), flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    """`vlm-jax score`: the request is checked before the model loads, its length before
    anything compiles; a typed `<image>` places the image."""
    import json

    from vlm_jax.generate import score
    request = _Request(args.image, args.prompt)
    _check_request(request)
    model, template = _load_for_generation(args)
    prompt = _prompt_ids(model, template, request)
    completion = model.tokenizer.encode(args.completion)
    if not completion:
        raise ValueError("--completion encodes to no tokens")
    _check_length(model, request, len(prompt), len(completion), "--completion's tokens")
    logprobs = score(model.config, model.params, prompt.tolist(), completion,
                     _image_input(model, request)[None])
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (only once the new model is fully written)")
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
    p.set_defaults(func=_generate)

    p = sub.add_parser("score", help="per-token log-probabilities of a completion, as JSON")
    _add_generation_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help=PROMPT_HELP)
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
