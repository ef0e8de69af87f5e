"""How many prompts are decoded together: one batching policy for `vlm-jax generate`, `vlm-jax
eval` and the shapes evaluator (the export's self-check decodes its one probe prompt directly).

    answers = batched_generate(model_config, params, prompts, images, batch_size=8,
                               max_new_tokens=32, sampling=Sampling(temperature=0.7))
    texts = greedy_texts(model_config, params, tokenizer, prompts, images, 16, 24)

Every batch has the same shape: prompts are right-padded to one width (the longest prompt,
rounded up to a multiple of 32 tokens) and the last batch is filled up to `batch_size` rows with
copies of its first row (their outputs are dropped). So a whole call compiles the decoder once,
whatever the mix of prompt lengths. Rows with fewer images than the call's most get zero images
in the free slots, which no image token reads.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vlm_jax.inference.generate import GREEDY, Sampling, generate

WIDTH_MULTIPLE = 32  # prompt widths are rounded up to this: fewer distinct shapes, fewer compiles


def batched_generate(model_config: Any, params: Any, prompts: Sequence[np.ndarray],
                     images: Sequence[np.ndarray], batch_size: int, max_new_tokens: int,
                     sampling: Sampling = GREEDY, stop_ids: Sequence[int] = (),
                     stop_sequences: Sequence[Sequence[int]] = (),
                     prefix_lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The new token ids of each prompt i32[T] (image tokens expanded) given its images
    f32[M, S, S, 3] (M >= 0), up to its first stop (see `generate.generate`). prefix_lengths:
    per prompt, how many leading tokens attend bidirectionally (a `data.prefix_lm` model)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image stacks")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; supported: >= 1")
    if not prompts:
        return []
    width = -(-max(len(p) for p in prompts) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    num_images = max(len(i) for i in images)
    image_shape = next((i.shape[1:] for i in images if len(i)), None)
    batch_size = min(batch_size, len(prompts))  # no batch wider than the whole call
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        batch_images = None
        if num_images:
            batch_images = np.zeros((batch_size, num_images) + image_shape, np.float32)
        for row, index in enumerate(rows):
            ids[row, :len(prompts[index])] = prompts[index]
            lengths[row] = len(prompts[index])
            if num_images and len(images[index]):
                batch_images[row, :len(images[index])] = images[index]
        prefixes = None if prefix_lengths is None else np.array([prefix_lengths[i] for i in rows])
        tokens, counts = generate(model_config, params, ids, lengths, batch_images,
                                  max_new_tokens, sampling, stop_ids, stop_sequences,
                                  prefix_lengths=prefixes)
        outputs += [tokens[row, :counts[row]].tolist() for row in range(len(chunk))]
    return outputs


def greedy_texts(model_config: Any, params: Any, tokenizer: Any, prompts: Sequence[np.ndarray],
                 images: Sequence[np.ndarray], batch_size: int, max_new_tokens: int,
                 prefix_lengths: Sequence[int] | None = None) -> list[str]:
    """Greedy continuation of each prompt up to EOS, decoded and stripped."""
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]
    answers = batched_generate(model_config, params, prompts, images, batch_size, max_new_tokens,
                               GREEDY, stop_ids, prefix_lengths=prefix_lengths)
    return [tokenizer.decode(ids).strip() for ids in answers]
