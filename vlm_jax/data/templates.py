"""Chat templates per decoder family: a conversation -> text pieces flagged "learn this" or not.

Each template renders exactly the text of its family's official HF chat template (or, for
"vicuna", of LLaVA-1.5's `conv_vicuna_v1`), cut into `(text_segment, is_target)` pieces: the
targets are each assistant answer and the end-of-turn token that closes it, so the loss never
falls on prompts, roles or headers. BOS/EOS are written as text (`bos_token` / `eos_token`, as in
HF's `apply_chat_template`); the tokenizer encodes special-token strings as single ids.

Each template also carries `jinja`, an HF chat template (for `apply_chat_template`, e.g. in an
exported tokenizer/processor) that renders the same text, and also accepts HF multimodal contents
(`[{"type": "image"}, {"type": "text", "text": q}]` renders as "<image>\\n" + q, our training
format). Its generation prompt is our prompt up to where the answer starts.

Registry: `TEMPLATES[name]`, or `get_template(name)` which names the supported ones on a miss.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from vlm_jax.data.tokenizer import IMAGE_TOKEN
from vlm_jax.errors import ConfigError, DataError

Piece = tuple[str, bool]  # (text_segment, is_target)
Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
VICUNA_DEFAULT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's "
                         "questions.")


class TemplateError(DataError):
    """The conversation cannot be rendered by this template (roles out of order, ...)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A named renderer `(messages, bos_token, eos_token) -> pieces`. `special_tokens` are the
    strings it writes that must encode as single ids (add them to a tokenizer trained from
    scratch; a family's own tokenizer already has them). `jinja` is the same template as an HF
    chat template (variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt`)."""
    name: str
    render_pieces: Callable[[Sequence[Message], str, str], list[Piece]]
    jinja: str
    special_tokens: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], bos_token: str | None = None,
               eos_token: str | None = None) -> list[Piece]:
        """Pieces of the rendered conversation; "".join of their texts is the full prompt."""
        _check_roles(messages)
        return [p for p in self.render_pieces(messages, bos_token or "", eos_token or "") if p[0]]

    def text(self, messages: Sequence[Message], bos_token: str | None = None,
             eos_token: str | None = None) -> str:
        return "".join(text for text, _ in self.render(messages, bos_token, eos_token))


def _check_roles(messages: Sequence[Message]) -> None:
    """An optional leading system turn, then user / assistant alternating from user."""
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        turns = turns[1:]
    if not turns:
        raise TemplateError("conversation has no user turn")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TemplateError(f"turn {index} has role {message['role']!r}, expected {expected!r}"
                                " (an optional system turn first, then user/assistant alternating)")
        if not isinstance(message["content"], str):
            raise TemplateError(f"turn {index} content is {type(message['content']).__name__}, "
                                "expected str")


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


# The jinja twins share this prelude: `render_content` (a string, or HF multimodal items: an image
# renders as "<image>\n", text as itself), BOS/EOS as "" when the tokenizer has none (as our
# renderers take None), the system turn split off, and the role order `_check_roles` enforces.
# Every tag trims whitespace ("{%-", "-%}"), so only the quoted strings are output.
_JINJA_PRELUDE = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is none -%}
        {{- raise_exception('message content is none: expected a string or a list of items') -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}
                {{- '<image>\n' -}}
            {%- elif item['type'] == 'text' -%}
                {{- item['text'] -}}
            {%- else -%}
                {{- raise_exception('content item type ' ~ item['type'] ~ ' is not supported:'
                                    ~ ' expected image or text') -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set bos = bos_token if bos_token is defined and bos_token is not none else '' -%}
{%- set eos = eos_token if eos_token is defined and eos_token is not none else '' -%}
{%- set has_system = messages | length > 0 and messages[0]['role'] == 'system' -%}
{%- set system = render_content(messages[0]['content']) if has_system else none -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- if turns | length == 0 -%}
    {{- raise_exception('conversation has no user turn') -}}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
        {{- raise_exception('turn ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ': expected'
                            ~ ' an optional system turn first, then user/assistant alternating') -}}
    {%- endif -%}
{%- endfor -%}
"""


def _llama2(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """meta-llama/Llama-2-*-chat-hf: the system prompt goes inside the first [INST] block."""
    system, turns = _split_system(messages)
    pieces: list[Piece] = []
    for index, message in enumerate(turns):
        content = message["content"]
        if message["role"] == "user":
            if index == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            pieces.append((f"{bos}[INST] {content.strip()} [/INST]", False))
        else:
            pieces.append((f" {content.strip()} {eos}", True))
    return pieces


_LLAMA2_JINJA = _JINJA_PRELUDE + r"""
{%- for message in turns -%}
    {%- set content = render_content(message['content']) -%}
    {%- if message['role'] == 'user' -%}
        {%- if loop.first and has_system -%}
            {%- set content = '<<SYS>>\n' ~ system ~ '\n<</SYS>>\n\n' ~ content -%}
        {%- endif -%}
        {{- bos ~ '[INST] ' ~ content | trim ~ ' [/INST]' -}}
    {%- else -%}
        {{- ' ' ~ content | trim ~ ' ' ~ eos -}}
    {%- endif -%}
{%- endfor -%}
"""


def _llama3(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """meta-llama/Meta-Llama-3-*-Instruct (3.0: no date preamble); every turn ends <|eot_id|>."""
    pieces: list[Piece] = []
    for index, message in enumerate(messages):
        header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        if index == 0:
            header = bos + header
        body = message["content"].strip() + "<|eot_id|>"
        if message["role"] == "assistant":
            pieces += [(header, False), (body, True)]
        else:
            pieces.append((header + body, False))
    return pieces


_LLAMA3_JINJA = _JINJA_PRELUDE + r"""
{%- for message in messages -%}
    {{- (bos if loop.first else '') ~ '<|start_header_id|>' ~ message['role']
        ~ '<|end_header_id|>\n\n' ~ render_content(message['content']) | trim ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""


def _chatml_turns(messages: Sequence[Message]) -> list[Piece]:
    pieces: list[Piece] = []
    for message in messages:
        if message["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False),
                       (message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n",
                           False))
    return pieces


def _qwen2(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """Qwen/Qwen2-*-Instruct ChatML, with Qwen's default system prompt when none is given."""
    pieces: list[Piece] = []
    if messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{QWEN2_DEFAULT_SYSTEM}<|im_end|>\n", False))
    return pieces + _chatml_turns(messages)


def _chatml(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """Plain ChatML (Qwen3, SmolLM2 / SmolLM3 without their optional system preambles): no
    default system prompt."""
    return _chatml_turns(messages)


_CHATML_TURNS_JINJA = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ render_content(message['content'])
        ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
_CHATML_JINJA = _JINJA_PRELUDE + _CHATML_TURNS_JINJA
_QWEN2_JINJA = _JINJA_PRELUDE + r"""
{%- if not has_system -%}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}""" + _CHATML_TURNS_JINJA


def _gemma(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """google/gemma-3-*-it: the assistant is "model"; a system prompt opens the first user turn
    (Gemma 1/2 templates refuse a system turn; without one all three render the same)."""
    system, turns = _split_system(messages)
    first_user_prefix = "" if system is None else system + "\n\n"
    pieces: list[Piece] = [(bos, False)]
    for index, message in enumerate(turns):
        content = message["content"].strip()
        if message["role"] == "assistant":
            pieces += [("<start_of_turn>model\n", False), (content + "<end_of_turn>", True),
                       ("\n", False)]
        else:
            prefix = first_user_prefix if index == 0 else ""
            pieces.append((f"<start_of_turn>user\n{prefix}{content}<end_of_turn>\n", False))
    return pieces


_GEMMA_JINJA = _JINJA_PRELUDE + r"""
{{- bos -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- '<start_of_turn>user\n' ~ ((system ~ '\n\n') if loop.first and has_system else '')
            ~ render_content(message['content']) | trim ~ '<end_of_turn>\n' -}}
    {%- else -%}
        {{- '<start_of_turn>model\n' ~ render_content(message['content']) | trim
            ~ '<end_of_turn>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


def _vicuna(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """LLaVA-1.5 `conv_vicuna_v1` (SeparatorStyle.TWO): "{system} USER: {q} ASSISTANT: {a}</s>",
    with the BOS the Llama tokenizer prepends written explicitly."""
    system, turns = _split_system(messages)
    pieces: list[Piece] = [(bos + (VICUNA_DEFAULT_SYSTEM if system is None else system) + " ",
                            False)]
    for message in turns:
        if message["role"] == "user":
            pieces.append((f"USER: {message['content']} ", False))
        else:
            pieces += [("ASSISTANT:", False), (f" {message['content']}{eos}", True)]
    return pieces


_VICUNA_JINJA = _JINJA_PRELUDE + r"""
{%- set default_system = "A chat between a curious human and an artificial intelligence assistant."
    ~ " The assistant gives helpful, detailed, and polite answers to the human's questions." -%}
{{- bos ~ (system if has_system else default_system) ~ ' ' -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' ~ render_content(message['content']) ~ ' ' -}}
    {%- else -%}
        {{- 'ASSISTANT: ' ~ render_content(message['content']) ~ eos -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""


def _plain(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """LLaVA stage-1 alignment: one "<image>\\n" per image of the user turn (its instruction text is
    dropped), then the caption (the one assistant turn) and EOS; only caption + EOS are learned."""
    _, turns = _split_system(messages)
    answers = [m["content"] for m in turns if m["role"] == "assistant"]
    if len(answers) != 1:
        raise TemplateError(f"the plain template needs exactly one caption (assistant turn), "
                            f"got {len(answers)}")
    num_images = sum(m["content"].count(IMAGE_TOKEN) for m in turns if m["role"] == "user")
    return [(bos + f"{IMAGE_TOKEN}\n" * num_images, False), (answers[0].strip() + eos, True)]


# The generation prompt stands for the one caption: images, then the model writes it.
_PLAIN_JINJA = _JINJA_PRELUDE + r"""
{%- set counts = namespace(images=0, answers=0, caption='') -%}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {%- set counts.images = counts.images
                                + render_content(message['content']).count('<image>') -%}
    {%- else -%}
        {%- set counts.answers = counts.answers + 1 -%}
        {%- set counts.caption = render_content(message['content']) | trim -%}
    {%- endif -%}
{%- endfor -%}
{%- if counts.answers + (1 if add_generation_prompt else 0) != 1 -%}
    {{- raise_exception('the plain template needs exactly one caption (assistant turn), or none'
                        ~ ' and add_generation_prompt') -}}
{%- endif -%}
{{- bos ~ '<image>\n' * counts.images -}}
{%- if not add_generation_prompt -%}
    {{- counts.caption ~ eos -}}
{%- endif -%}
"""


def _minimal(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """No role names and no default system prompt: "{bos}[{system}\\n]{q}\\n{a}{eos}{q}\\n{a}{eos}".
    For models trained from scratch with a tiny tokenizer (the shapes recipe), where every prompt
    token costs compute and a role name teaches nothing."""
    system, turns = _split_system(messages)
    pieces: list[Piece] = [(bos if system is None else f"{bos}{system}\n", False)]
    for message in turns:
        if message["role"] == "user":
            pieces.append((message["content"] + "\n", False))
        else:
            pieces.append((message["content"] + eos, True))
    return pieces


def _paligemma(messages: Sequence[Message], bos: str, eos: str) -> list[Piece]:
    """PaliGemma / PaliGemma 2 (big_vision; transformers' PaliGemmaProcessor): one prefix, one
    suffix: "<image>" per image, then "{bos}{prefix}\n", then "{suffix}{eos}". The images go
    first wherever the content holds them (the processor puts them there too); no system turn
    and one question only, as PaliGemma has neither a system prompt nor turns."""
    system, turns = _split_system(messages)
    if system is not None or len(turns) > 2:
        raise TemplateError("the paligemma template renders one user turn and its answer, "
                            f"with no system turn; got {len(messages)} messages"
                            + (" starting with a system turn" if system is not None else ""))
    content = turns[0]["content"]
    text = content.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")
    pieces: list[Piece] = [(IMAGE_TOKEN * content.count(IMAGE_TOKEN) + f"{bos}{text}\n", False)]
    if len(turns) == 2:
        pieces.append((turns[1]["content"] + eos, True))
    return pieces


_PALIGEMMA_JINJA = _JINJA_PRELUDE + r"""
{%- if has_system or turns | length > 2 -%}
    {{- raise_exception('the paligemma template renders one user turn and its answer, with no'
                        ~ ' system turn') -}}
{%- endif -%}
{%- set prefix = render_content(turns[0]['content']) -%}
{{- '<image>' * prefix.count('<image>') ~ bos
    ~ prefix.replace('<image>\n', '').replace('<image>', '') ~ '\n' -}}
{%- if turns | length == 2 -%}
    {{- render_content(turns[1]['content']) ~ eos -}}
{%- endif -%}
"""

# What transformers' PaliGemmaProcessor is given (it writes the BOS after the last image and the
# closing "\n" itself): the images, then the prefix. The processor of a PaliGemma export carries
# this; its tokenizer files carry _PALIGEMMA_JINJA, the whole training text.
PALIGEMMA_PROCESSOR_JINJA = _JINJA_PRELUDE + r"""
{%- if has_system or turns | length != 1 -%}
    {{- raise_exception('a PaliGemma prompt is one user turn (the answer is the processor\'s'
                        ~ ' suffix), with no system turn') -}}
{%- endif -%}
{%- set prefix = render_content(turns[0]['content']) -%}
{{- '<image>' * prefix.count('<image>') ~ prefix.replace('<image>\n', '').replace('<image>', '') -}}
"""


_MINIMAL_JINJA = _JINJA_PRELUDE + r"""
{{- bos ~ ((system ~ '\n') if has_system else '') -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- render_content(message['content']) ~ '\n' -}}
    {%- else -%}
        {{- render_content(message['content']) ~ eos -}}
    {%- endif -%}
{%- endfor -%}
"""


TEMPLATES: dict[str, ChatTemplate] = {
    name: ChatTemplate(name, fn, jinja, special) for name, fn, jinja, special in [
        ("llama2", _llama2, _LLAMA2_JINJA, ()),
        ("llama3", _llama3, _LLAMA3_JINJA,
         ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        ("qwen2", _qwen2, _QWEN2_JINJA, ("<|im_start|>", "<|im_end|>")),
        ("chatml", _chatml, _CHATML_JINJA, ("<|im_start|>", "<|im_end|>")),
        ("gemma", _gemma, _GEMMA_JINJA, ("<start_of_turn>", "<end_of_turn>")),
        ("vicuna", _vicuna, _VICUNA_JINJA, ()),
        ("plain", _plain, _PLAIN_JINJA, ()),
        ("minimal", _minimal, _MINIMAL_JINJA, ()),
        ("paligemma", _paligemma, _PALIGEMMA_JINJA, ())]
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; supported: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
