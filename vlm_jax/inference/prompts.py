"""Prompts as training saw them: a question (or a conversation) rendered by the chat template up
to where the answer starts, the image placed and expanded to the model's image tokens; and what
ends an answer (`stop_token_ids`). generate, score, eval and the export's self-check all build
their prompts here.

    ids = prompt_ids(tokenizer, "What colour is the circle?", "minimal", num_image_tokens=64)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vlm_jax.data import tiling
from vlm_jax.data.templates import get_template
from vlm_jax.errors import InputError
from vlm_jax.models import families



def family_template(family: str) -> str:
    """The chat template a decoder family is trained and decoded with (models/families/), for a
    model that records none (an import)."""
    return families.get(family).template


def user_content(question: str, image_token: str) -> str:
    """The user turn about one image: `<image>\n` + question, as in training; or the question as
    typed when it places the image itself with one `<image>` (as LLaVA prompts do), so a typed
    placeholder never doubles the image's slots. More than one `<image>` is an error."""
    count = question.count(image_token)
    if count > 1:
        raise InputError(f"the prompt holds {count} {image_token} placeholders for one image (type "
                         f"one to place the image, or none: the template adds it before the prompt)")
    return question if count else f"{image_token}\n{question}"


def prompt_ids(tokenizer: Any, question: str, template: str, num_image_tokens: int,
               image_grid: tuple[int, int] | None = None) -> np.ndarray:
    """i32[T]: the template's text up to where the answer starts, the image placed by
    `user_content`, expanded to `num_image_tokens` image tokens (with `image_grid`, a tiled
    image: its layout, data/tiling.py)."""
    return conversation_prompt_ids(
        tokenizer, [{"role": "user", "content": user_content(question, tokenizer.image_token)}],
        template, num_image_tokens, None if image_grid is None else [image_grid])


def conversation_prompt_ids(tokenizer: Any, conversation: Sequence[Mapping[str, str]],
                            template: str, num_image_tokens: int,
                            image_grids: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """i32[T]: `conversation` (ending with a user turn; earlier answers are context) rendered by
    the template up to where the next answer starts, each image token expanded to
    `num_image_tokens` (`Tokenizer.expand_images`), or with `image_grids` (tiled images, one
    (rows, cols) per image) to each image's layout text before encoding, as the pipeline does:
    exactly the ids training saw before that answer."""
    messages = list(conversation) + [{"role": "assistant", "content": ""}]
    pieces = get_template(template).render(messages, tokenizer.bos_token, tokenizer.eos_token)
    targets = [i for i, (_, is_target) in enumerate(pieces) if is_target]
    num_answers = sum(m["role"] == "assistant" for m in messages)
    if len(targets) != num_answers:
        raise InputError(f"template {template!r} renders an empty answer as no text (a tokenizer "
                         f"without an EOS token?): cannot tell where the answer starts")
    text = "".join(text for text, _ in pieces[:targets[-1]])
    if image_grids is not None:
        try:
            text = tiling.expand_placeholders(text, tokenizer.image_token, image_grids,
                                              num_image_tokens)
        except ValueError as e:
            raise InputError(str(e)) from None
    ids = np.asarray(tokenizer.encode(text), np.int32)
    return ids if image_grids is not None else tokenizer.expand_images(ids, num_image_tokens)[0]



def stop_token_ids(tokenizer: Any, template: str | None) -> list[int]:
    """The ids that end an answer: EOS, and the template's end-of-turn token when it is another
    single token (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma):
    what follows an answer in the template's rendering of a conversation."""
    ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    if template is None:
        return ids
    answer = "x"
    pieces = get_template(template).render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
        tokenizer.bos_token, tokenizer.eos_token)
    closing = [text for text, is_target in pieces if is_target][-1]
    closing = closing[closing.index(answer) + len(answer):].strip()
    end_ids = tokenizer.encode(closing) if closing else []
    if len(end_ids) == 1 and end_ids[0] not in ids:
        ids.append(end_ids[0])
    return ids


def trim_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]
