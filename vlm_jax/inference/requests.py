"""Requests to `vlm-jax generate` / `score`: an image and a prompt, from flags or a JSONL file,
every one checked (placeholders, the image decoded, the length against the model's positions)
before anything compiles; errors name the flag or the file and line.

    requests = read_requests("questions.jsonl")       # [Request(image, prompt, "FILE line N")]
    for request in requests:
        check_request(request)                         # before the model loads
    ids = request_prompt_ids(model, template, request) # i32[T], as training saw it
"""
from __future__ import annotations

import json
from typing import NamedTuple

from vlm_jax.data.errors import SkipExample
from vlm_jax.data import tiling
from vlm_jax.data.images import decode_image
from vlm_jax.data.tokenizer import IMAGE_TOKEN
from vlm_jax.errors import InputError
from vlm_jax.inference.prompts import prompt_ids, user_content

# JSON's names for what json.loads returns, for messages about a requests file.
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


class Request(NamedTuple):
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


def read_requests(path: str) -> list[Request]:
    """The requests of a JSONL file, one object {"image": PATH, "prompt": TEXT} per non-blank
    line; anything else is an error naming the file and line."""
    requests = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--requests {path}: {getattr(e, 'strerror', None) or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path} line {number}"
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{source}: not JSON ({e.msg}); a request is "
                             f'{{"image": PATH, "prompt": TEXT}}') from None
        if not isinstance(request, dict):
            raise InputError(f"{source}: a request is a JSON object "
                             f'{{"image": PATH, "prompt": TEXT}}, got {_JSON_TYPES[type(request)]}')
        if not {"image", "prompt"} <= set(request):
            raise InputError(f"{source}: a request needs 'image' and 'prompt', got keys "
                             f"{sorted(request)}")
        for key in ("image", "prompt"):
            if not isinstance(request[key], str):
                raise InputError(f"{source}: {key!r} must be a string, got "
                                 f"{_JSON_TYPES[type(request[key])]}")
        requests.append(Request(request["image"], request["prompt"], source))
    if not requests:
        raise InputError(f"--requests {path} holds no requests")
    return requests


def check_request(request: Request) -> None:
    """What can be checked without the model: the prompt's image placeholders and the image
    (decoded once here, so that no bad image stops a run halfway)."""
    try:
        user_content(request.prompt, IMAGE_TOKEN)
    except ValueError as e:
        raise InputError(f"{request.prompt_label()}: {e}") from None
    read_image(request)


def read_image(request: Request):
    """u8[H, W, 3]: the request's image decoded; a missing or undecodable file is an error."""
    try:
        with open(request.image, "rb") as f:
            return decode_image(f.read())
    except OSError as e:
        raise InputError(f"{request.image_label()}: {e.strerror or e}") from None
    except SkipExample as e:
        raise InputError(f"{request.image_label()}: not a usable image ({e})") from None


def request_prompt_ids(model, template: str, request: Request):
    """i32[T]: the request's prompt as training saw it (template, image tokens expanded; a
    tiled model: the image's layout)."""
    grid = None
    if model.tiling.enabled:  # the grid follows from the image's size: no need to cut it here
        height, width = read_image(request).shape[:2]
        if model.pad_to_square:
            height = width = max(height, width)
        grid = tiling.grid_for(height, width, model.config.vision.image_size, model.tiling)
    try:
        return prompt_ids(model.tokenizer, request.prompt, template, model.config.tokens_per_image,
                          grid)
    except ValueError as e:
        raise InputError(f"{request.prompt_label()}: {e}") from None


def check_length(model, request: Request, prompt_length: int, more: int, what: str) -> None:
    """The prompt plus `more` tokens must fit the model's positions."""
    limit = model.config.llm.max_position_embeddings
    if prompt_length + more > limit:
        raise InputError(f"{request.prompt_label()}: the prompt is {prompt_length} tokens (template "
                         f"and {model.config.tokens_per_image} image tokens included); with {what} "
                         f"{more} that is {prompt_length + more} > max_position_embeddings {limit} "
                         f"of the model")


def image_input(model, request: Request):
    """f32[k, S, S, 3]: the request's image preprocessed as in training (k = 1, or a tiled
    model's tiles and global view)."""
    return tiling.model_images(read_image(request), model.config.vision.image_size,
                               model.pad_to_square, model.tiling)[0]


def request_inputs(model, template: str, image_path: str, prompt: str):
    """(prompt ids i32[T], image f32[k, S, S, 3]) of one image + prompt, as `generate` builds
    them (template, image placement and preprocessing as in training)."""
    request = Request(image_path, prompt)
    return request_prompt_ids(model, template, request), image_input(model, request)
