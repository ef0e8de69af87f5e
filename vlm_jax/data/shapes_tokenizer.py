"""The shapes tokenizer, fitted in one place: the trainer (`tokenizer.kind="shapes"`),
`vlm-jax inspect-data` and the shapes recipe all call `fit_shapes_tokenizer`.

A byte-level BPE (`tokenizer.train_word_tokenizer`) fitted on texts as the phases render them:
each scene's caption, and its questions and answers as one conversation in the chat template
(the caption before the first question), so that every word, also right after a newline or a
template marker, becomes one token. The scenes are those of the run's shapes world (the
`shapes` / `colors` / `sizes` options of its first shapes source), so a restricted world gets a
tokenizer of its own words.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from vlm_jax.data.sources.shapes import ShapesSource
from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer, train_word_tokenizer

WORLD_OPTIONS = ("shapes", "colors", "sizes")  # the ShapesSource options that define its world


def world_of(sources: Sequence[Any]) -> dict[str, Any]:
    """The world options of the first shapes source among data config `sources` ({} = the
    whole world, also when there is no shapes source)."""
    for source in sources:
        if source.kind == "shapes":
            return {k: v for k, v in source.options.items() if k in WORLD_OPTIONS}
    return {}


def corpus_texts(num_examples: int, seed: int, template: str,
                 world: Mapping[str, Any] | None = None) -> list[str]:
    """Two texts per training scene: its caption, and its conversation rendered by `template`."""
    chat = get_template(template)
    source = ShapesSource("train", seed=seed, image_size=8, turns_per_example=4, **(world or {}))
    texts = []
    for index in range(num_examples):
        scene, turns = source.sample(index)
        conversation = []
        for _, question, answer in turns:
            conversation += [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]
        caption = source.caption(scene)
        conversation[0]["content"] = caption + ". " + conversation[0]["content"]
        texts += [caption, chat.text(conversation)]
    return texts


def fit_shapes_tokenizer(num_examples: int, seed: int, vocab_size: int, template: str = "minimal",
                         world: Mapping[str, Any] | None = None,
                         special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The tokenizer of `tokenizer.kind="shapes"`: reserved ids <pad>=0 <bos>=1 <eos>=2 <unk>=3
    <image>=4, then `special_tokens` (e.g. data.tiling's layout tokens), at most `vocab_size`
    ids."""
    return train_word_tokenizer(corpus_texts(num_examples, seed, template, world),
                                special_tokens=special_tokens, vocab_size=vocab_size)
