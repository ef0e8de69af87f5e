"""KV-cache decoding of the families with sliding windows, soft-caps and q/k norms (Gemma 2,
Gemma 3, Qwen3), each as transformers' LLaVA over the family's tiny text config (conftest's
HFTiny: window 8, soft-caps), imported with `vlm-jax import-hf`.

Why: generation runs the model's own `DecoderBlock` with a `KVCache` (models/decoder.py), and the
sliding window is applied there against cache slots in decode but against positions in prefill;
a slot/position mix-up, a window off by one, a soft-cap or a q/k norm missed in the cached path
only shows once prompt + new tokens run well past the window. Each test builds 7- to 15-token
prompts (image included) and decodes 16 tokens: positions up to 30 against a window of 8.
"""
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vlm_jax
from vlm_jax.cli import main as cli_main
from vlm_jax.inference import generate as gen
from vlm_jax.models import layers
from vlm_jax.models.families.base import FULL, SLIDING
from vlm_jax.models.vlm import VLM

FAMILIES = ("gemma2", "gemma3", "qwen3")
SLIDING_FAMILIES = ("gemma2", "gemma3")   # HFTiny gives these window 8 on layer 0
WINDOW = 8
VOCAB = 96
IMAGE_TOKEN_ID = 95
TOKENS_PER_IMAGE = 4                      # 16 px images, 8 px patches
PROMPT_TEXT_LENGTHS = (6, 1, 9)           # after 2 text + 4 image tokens: prompts of 12, 7, 15
NEW_TOKENS = 16


def _hf_llava(hf_tiny, family):
    """A tiny HF LLaVA over the family's text config (eager attention, the plain softmax
    reference for every family: SDPA takes no attention soft-cap) with EVERY tensor perturbed
    (vision tower and projector too): HF's init leaves norms at 1 (0 for Gemma's 1 + w),
    biases at 0 and projections small, which would hide a norm or layout bug and make greedy
    decoding repeat one token. Untied head: the final soft-cap is absent either way (LLaVA does
    not apply it, and the import drops it), and argmax does not see a monotonic cap."""
    torch.manual_seed(0)
    text_config = hf_tiny.text(family, tie=False, vocab=VOCAB, eos_token_id=None,
                               bos_token_id=None, pad_token_id=0)
    config = LlavaConfig(
        vision_config=hf_tiny.vision(image_size=16, patch=8, layers=1),
        text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE, vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    assert model.model.language_model.config._attn_implementation == "eager"
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def _right_padded(prompts):
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    return ids, np.array([len(p) for p in prompts], np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, hf_tiny, tmp_path_factory):
    """The family's HF model, our LoadedModel of the same weights, the prompts and images, the
    batched right-padded greedy tokens and the greedy recomputation (`_greedy_by_recomputation`)."""
    family = request.param
    hf_model = _hf_llava(hf_tiny, family)
    root = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(root / "hf")
    assert cli_main(["import-hf", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    model = vlm_jax.load(str(root / "ckpt"))
    llm = model.config.llm
    if family in SLIDING_FAMILIES:
        assert llm.sliding_window == WINDOW and llm.layer_types == (SLIDING, FULL), llm
    rng = np.random.default_rng(0)
    image = [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
    prompts = [np.concatenate([rng.integers(1, IMAGE_TOKEN_ID, 2), image,
                               rng.integers(1, IMAGE_TOKEN_ID, n)]).astype(np.int32)
               for n in PROMPT_TEXT_LENGTHS]
    images = rng.uniform(-1, 1, (len(prompts), 1, 16, 16, 3)).astype(np.float32)
    ids, lengths = _right_padded(prompts)
    tokens, counts = gen.greedy_generate(model.config, model.params, ids, lengths, images,
                                         NEW_TOKENS)
    assert np.all(counts == NEW_TOKENS)
    return types.SimpleNamespace(
        family=family, hf_model=hf_model, model=model, prompts=prompts, images=images,
        tokens=tokens, recomputed=_greedy_by_recomputation(model, prompts, images, NEW_TOKENS))


@functools.lru_cache(maxsize=None)
def _uncached_forward(config):
    """jit (params, ids [B, W], prompt_lengths [B], images) -> logits [B, W, V]: one plain
    forward (scanned blocks, no cache) over each row's prompt (image features spliced in) and
    then the generated ids as text tokens, as decoding feeds them: a generated id that happens to
    be the image token is embedded as a token, never given an image feature."""
    def forward(params, ids, prompt_lengths, images):
        model = VLM(config)
        b, w = ids.shape
        in_prompt = jnp.arange(w)[None, :] < prompt_lengths[:, None]
        prompt = model.apply({"params": params}, jnp.where(in_prompt, ids, 0), images,
                             method=VLM.embed)
        tokens = model.apply({"params": params}, ids, method=lambda m, ids: m.llm.embed(ids))
        x = jnp.where(in_prompt[..., None], prompt, tokens)
        positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
        mask = layers.make_attention_mask(jnp.ones((b, w), jnp.int32))
        return model.apply({"params": params}, x, positions, mask, method=lambda m, *a: m.llm(*a))
    return jax.jit(forward)


def _greedy_by_recomputation(model, prompts, images, steps):
    """Greedy tokens [B, steps] where each is the argmax of a full forward (no cache) over the
    prompt + the tokens so far, plus the smallest top-1 / top-2 logit gap seen (a near tie
    would make the comparisons a matter of rounding) and the final sequences [B, W]. All rows in
    one buffer of width max prompt + steps: the mask is causal, so what follows a row's
    current token cannot reach it."""
    ids, lengths = _right_padded(prompts)
    batch = len(prompts)
    sequence = np.zeros((batch, ids.shape[1] + steps), np.int32)
    sequence[:, :ids.shape[1]] = ids
    out, gap, rows = np.zeros((batch, steps), np.int32), np.inf, np.arange(batch)
    forward = _uncached_forward(model.config)
    for step in range(steps):
        logits = np.asarray(forward(model.params, sequence, lengths, images))
        last = logits[rows, lengths + step - 1]                 # [B, V]
        top2 = np.sort(last, axis=-1)[:, -2:]
        gap = min(gap, float(np.min(top2[:, 1] - top2[:, 0])))
        out[:, step] = np.argmax(last, axis=-1)
        sequence[rows, lengths + step] = out[:, step]
    return out, gap, sequence, lengths


@pytest.mark.parity
def test_cached_greedy_matches_recomputation_and_transformers_past_the_window(imported):
    """Why: the cached loop must give, token for token, what recomputing the whole sequence
    gives (ours, no cache) and what transformers' `generate` gives on the same weights, well past
    the sliding window (Gemma 2 / 3), with Gemma 2's attention soft-cap, Gemma 3's q/k norms,
    local/global RoPE bases and linear scaling, Qwen3's q/k norms and separate head_dim."""
    prompts, images, tokens = imported.prompts, imported.images, imported.tokens
    assert len({tuple(row) for row in tokens}) == len(prompts), "rows should differ"
    assert len(set(tokens[:, 0].tolist())) == len(prompts), f"first tokens all alike: {tokens}"
    assert all(len(set(row.tolist())) >= NEW_TOKENS // 2 for row in tokens), \
        f"degenerate test model: {tokens}"

    want, gap, _, _ = imported.recomputed
    assert gap > 1e-3, f"near tie in the greedy choice ({gap}): pick another seed"
    np.testing.assert_array_equal(tokens, want)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            hf_out = imported.hf_model.generate(
                input_ids=torch.tensor(prompt[None], dtype=torch.long),
                pixel_values=torch.tensor(images[row].transpose(0, 3, 1, 2)),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert hf_out[0, len(prompt):].tolist() == tokens[row].tolist(), f"row {row}"


def test_the_window_is_reached(imported):
    """Why: the comparisons above only prove the window if it changes the outputs. The same
    model with a window longer than the sequence (same layer types, so the same per-layer RoPE)
    gives the very same logits where a query's window still covers the whole sequence
    (position < 8) and other logits after it."""
    family, model, images = imported.family, imported.model, imported.images
    if family not in SLIDING_FAMILIES:
        pytest.skip(f"{family}: no sliding layers in this config")
    _, _, sequence, lengths = imported.recomputed
    llm = dataclasses.replace(model.config.llm, sliding_window=sequence.shape[1])
    full_config = dataclasses.replace(model.config, llm=llm)
    windowed = np.asarray(_uncached_forward(model.config)(model.params, sequence, lengths, images))
    full = np.asarray(_uncached_forward(full_config)(model.params, sequence, lengths, images))
    np.testing.assert_allclose(full[:, :WINDOW], windowed[:, :WINDOW], atol=1e-5)
    assert np.all(np.abs(full[:, WINDOW:] - windowed[:, WINDOW:]).max(-1) > 1e-2)


def test_batched_right_padded_rows_decode_as_they_do_alone(imported):
    """Why: in a right-padded batch a short row's new tokens overwrite the padding's cache slots
    (prompt_lengths[b] + n), and its window must count its own positions, not the batch width:
    in a batch of rows of 12, 7 and 15 tokens, the two padded ones (the 7-token row has 8
    padding slots, a whole window) must decode exactly as each does alone in a batch of one,
    unpadded. (The unpadded 15-token row is left out, as is Qwen3, which has no window here:
    each alone costs a compile, and every row already matches recomputation above.)"""
    family, model, prompts, images = (imported.family, imported.model, imported.prompts,
                                      imported.images)
    if family not in SLIDING_FAMILIES:
        pytest.skip(f"{family}: no sliding layers in this config")
    for row in (1, 0):
        prompt = prompts[row]
        alone, count = gen.greedy_generate(model.config, model.params, prompt[None],
                                           np.array([len(prompt)], np.int32),
                                           images[row:row + 1], NEW_TOKENS)
        assert count[0] == NEW_TOKENS
        assert alone[0].tolist() == imported.tokens[row].tolist(), f"{family} row {row}"
