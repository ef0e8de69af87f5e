"""KV-cache generation and scoring: against step-by-step full recomputation, transformers'
`generate` and forward on the same weights, sampling statistics, stops, an 8-device mesh, and the
`vlm-jax generate` / `score` commands."""
import contextlib
import functools
import io
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vlm_jax
from vlm_jax.inference import generate as gen
from vlm_jax.inference import prompts as prompting
from vlm_jax import model_dir, sharding
from vlm_jax.cli import main as cli_main
from vlm_jax.models.vlm import VLM, dummy_inputs, init_params

VOCAB = 96
IMAGE_TOKEN_ID = 95
TOKENS_PER_IMAGE = 16
NEW_TOKENS = 8
PROMPT_TEXT_LENGTHS = (3, 7, 12)  # text tokens after the image, one row each


def _hf_llava(hf_tiny, family):
    torch.manual_seed(0)
    text_config = hf_tiny.text(family, tie=family == "gemma", vocab=VOCAB, eos_token_id=None,
                               bos_token_id=None, pad_token_id=0)
    config = LlavaConfig(
        vision_config=hf_tiny.vision(layers=2, vision_use_head=True),
        text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE, vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu",
        tie_word_embeddings=family == "gemma")
    model = LlavaForConditionalGeneration(config).eval()
    # Make the tiny random model's greedy output depend on attention over the whole context, so a
    # wrong cache mask changes tokens: at this init the (for Gemma tied and sqrt(d)-scaled)
    # embeddings dominate the residual stream and greedy decoding just repeats a token; 10x larger
    # projections fix that. (Scaling the embeddings instead would hide a broken cache mask.)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if "proj" in name:
                param.mul_(10.0)
    return model


@pytest.fixture(scope="module", params=["llama", "gemma"])
def imported(request, hf_tiny, tmp_path_factory):
    """(HF model, our LoadedModel of the same weights, prompts, images)."""
    hf_model = _hf_llava(hf_tiny, request.param)
    root = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(root / "hf")
    assert cli_main(["import-hf", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    model = vlm_jax.load(str(root / "ckpt"))
    rng = np.random.default_rng(0)
    prompts = [np.concatenate([rng.integers(1, IMAGE_TOKEN_ID, 2), [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE,
                               rng.integers(1, IMAGE_TOKEN_ID, n)]).astype(np.int32)
               for n in PROMPT_TEXT_LENGTHS]
    images = rng.uniform(-1, 1, (len(prompts), 1, 32, 32, 3)).astype(np.float32)
    return hf_model, model, prompts, images


def _right_padded(prompts):
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    return ids, np.array([len(p) for p in prompts], np.int32)


def _forward_logits(model, ids, images):
    """Our plain (uncached) forward: logits f32[B, T, V]."""
    b, t = ids.shape
    return np.asarray(model._forward(model.params, input_ids=ids, images=images,
                                     positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                                     mask_ar=np.ones((b, t), np.int32)))


def _greedy_by_recomputation(model, prompt, image, steps):
    """Argmax of a full forward over prompt + tokens so far, one step at a time (fixed width)."""
    sequence = np.zeros((1, len(prompt) + steps), np.int32)
    sequence[0, :len(prompt)] = prompt
    out = []
    for step in range(steps):
        logits = _forward_logits(model, sequence, image[None])
        token = int(np.argmax(logits[0, len(prompt) + step - 1]))
        sequence[0, len(prompt) + step] = token
        out.append(token)
    return out


@pytest.mark.parity
def test_cached_greedy_matches_recomputation_and_transformers(imported):
    hf_model, model, prompts, images = imported
    ids, lengths = _right_padded(prompts)
    tokens, counts = gen.greedy_generate(model.config, model.params, ids, lengths, images, NEW_TOKENS)
    assert np.all(counts == NEW_TOKENS)
    assert len({tuple(row) for row in tokens}) == len(prompts), "rows should differ"
    assert all(len(set(row.tolist())) >= 3 for row in tokens), f"degenerate test model: {tokens}"
    for row, prompt in enumerate(prompts):
        assert tokens[row].tolist() == _greedy_by_recomputation(model, prompt, images[row], NEW_TOKENS)
        with torch.no_grad():
            hf_out = hf_model.generate(
                input_ids=torch.tensor(prompt[None], dtype=torch.long),
                pixel_values=torch.tensor(images[row].transpose(0, 3, 1, 2)),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert hf_out[0, len(prompt):].tolist() == tokens[row].tolist()


@pytest.mark.parity
def test_score_matches_transformers_log_softmax(imported):
    hf_model, model, prompts, images = imported
    prompt, completion = prompts[1], [5, 17, 42, 9]
    logprobs = gen.score(model.config, model.params, prompt, completion, images[1:2])
    with torch.no_grad():
        full = torch.tensor(np.concatenate([prompt, completion])[None], dtype=torch.long)
        logits = hf_model(input_ids=full, pixel_values=torch.tensor(images[1].transpose(0, 3, 1, 2))
                          ).logits[0].double()
    want = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()[np.arange(4), completion]
    np.testing.assert_allclose(logprobs, want, atol=2e-4)


# ----------------------------------------------------------------------------- our own tiny VLM

def _init(config, seed):
    """init_params in one compiled program (run op by op it costs more than the tests using it)."""
    return jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))


@pytest.fixture(scope="module")
def tiny(tiny_vlm_config):
    config = tiny_vlm_config()  # vocabulary 64, <image> = 63
    params = _init(config, 3)
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 6.0
    rng = np.random.default_rng(1)
    prompts = [np.concatenate([[63] * config.tokens_per_image, rng.integers(1, 63, n)]).astype(np.int32)
               for n in (2, 5, 9, 4)]
    images = rng.uniform(-1, 1, (4, 1, 16, 16, 3)).astype(np.float32)
    return config, params, prompts, images


@functools.lru_cache(maxsize=None)
def _plain_forward(config):
    """VLM.__call__ jitted: (params, ids [1, T], images, positions, mask_ar) -> logits."""
    return jax.jit(lambda params, ids, images, positions, mask_ar: VLM(config).apply(
        {"params": params}, ids, images, positions, mask_ar))


def _teacher_forced_logits(config, params, prompt, continuation, image, width):
    """Logits predicting each continuation token, from a forward over prompt + continuation in a
    buffer of `width` (one compile for every row; later tokens do not reach earlier ones)."""
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(prompt) + len(continuation)] = np.concatenate([prompt, continuation])
    logits = _plain_forward(config)(params, ids, image[None], np.arange(width)[None],
                                    np.ones((1, width), np.int32))
    start = len(prompt) - 1
    return np.asarray(logits[0, start:start + len(continuation)])  # [len(continuation), V]


def test_sampling_is_seeded_and_stays_in_top_k(tiny):
    config, params, prompts, images = tiny
    ids, lengths = _right_padded(prompts)
    sample = lambda **kw: gen.generate(config, params, ids, lengths, images, 6, gen.Sampling(**kw))[0]
    first = sample(temperature=1.5, top_k=3, seed=7)
    np.testing.assert_array_equal(first, sample(temperature=1.5, top_k=3, seed=7))
    assert not np.array_equal(first, sample(temperature=1.5, top_k=3, seed=8))
    width = ids.shape[1] + first.shape[1]
    for row, prompt in enumerate(prompts):
        logits = _teacher_forced_logits(config, params, prompt, first[row], images[row], width)
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(token in top3[i] for i, token in enumerate(first[row]))
    # a nucleus too small for anything but the most likely token is greedy
    greedy = gen.greedy_generate(config, params, ids, lengths, images, 6)[0]
    np.testing.assert_array_equal(sample(temperature=1.0, top_p=1e-6, seed=1), greedy)


def test_prefix_lm_greedy_matches_recomputation_under_the_prefix_mask(tiny):
    """prefix_lengths (a model trained with data.prefix_lm, PaliGemma style): row b's first
    prefix_lengths[b] tokens attend to each other bidirectionally in the prefill, the rest of the
    prompt and the new tokens are causal; right-padded rows each see only their own prompt."""
    config, params, prompts, images = tiny
    ids, lengths = _right_padded(prompts)
    prefixes = lengths.copy()
    prefixes[1] = config.tokens_per_image + 2     # a prefix shorter than the prompt
    steps = 5
    tokens = gen.greedy_generate(config, params, ids, lengths, images, steps,
                                 prefix_lengths=prefixes)[0]
    causal = gen.greedy_generate(config, params, ids, lengths, images, steps)[0]
    assert not np.array_equal(tokens, causal), "the prefix mask should change some tokens"
    # One buffer width for every row (one compile): what follows the sequence is causal, so it
    # cannot reach the positions read, and the prefix ends inside the prompt.
    width = ids.shape[1] + steps
    for row, prompt in enumerate(prompts):
        sequence = np.zeros((1, width), np.int32)
        sequence[0, :len(prompt)] = prompt
        mask_ar = np.ones_like(sequence)
        mask_ar[0, :prefixes[row]] = 0
        positions = np.arange(width)[None]
        for step in range(steps):
            logits = _plain_forward(config)(params, sequence, images[row][None], positions, mask_ar)
            sequence[0, len(prompt) + step] = int(np.argmax(logits[0, len(prompt) + step - 1]))
        assert tokens[row].tolist() == sequence[0, len(prompt):len(prompt) + steps].tolist()
    with pytest.raises(ValueError, match="prefix_lengths"):
        gen.greedy_generate(config, params, ids, lengths, images, 2, prefix_lengths=lengths + 1)


def test_kept_layer_split_follows_the_params_passed(tiny):
    """The per-layer copy of the weights kept between calls (CPU) is used only for the very
    arrays it was made from: new params with the same shapes give their own tokens."""
    config, params, prompts, images = tiny
    ids, lengths = _right_padded(prompts)
    gen.clear_layer_cache()
    first = gen.greedy_generate(config, params, ids, lengths, images, 6)[0]
    assert len(gen._LAYER_SPLIT_CACHE) == 1
    other = jax.tree.map(lambda x: x, params)
    other["llm"]["layers"] = jax.tree.map(lambda w: -w, params["llm"]["layers"])
    changed = gen.greedy_generate(config, other, ids, lengths, images, 6)[0]
    gen.clear_layer_cache()
    np.testing.assert_array_equal(changed,
                                  gen.greedy_generate(config, other, ids, lengths, images, 6)[0])
    assert not np.array_equal(first, changed)
    np.testing.assert_array_equal(first, gen.greedy_generate(config, params, ids, lengths,
                                                             images, 6)[0])


def test_sample_tokens_frequencies_match_truncated_softmax():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)

    def draw(keys, top_k, top_p):
        one = lambda key: gen.sample_tokens(logits, key, 1.0, top_k, top_p)[0]  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys))

    counts = np.bincount(draw(keys, top_k=3, top_p=1.0), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.03)
    # top_p=0.6: 0.4 alone is short of 0.6, 0.4 + 0.3 reaches it -> {1, 3}
    counts = np.bincount(draw(keys, top_k=0, top_p=0.6), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.03)


def test_stop_ids_and_sequences(tiny):
    config, params, prompts, images = tiny
    ids, lengths = _right_padded(prompts)
    free = gen.greedy_generate(config, params, ids, lengths, images, 8)[0]

    def first_stop(row, sequences):
        """numpy: tokens before the first place any sequence ends in row's free output."""
        for end in range(1, 9):
            for seq in sequences:
                if end >= len(seq) and list(free[row, end - len(seq):end]) == list(seq):
                    return end - len(seq)
        return 8

    sequences = [list(free[0, 3:5]), [int(free[2, 1])]]
    tokens, counts = gen.generate(config, params, ids, lengths, images, 8,
                                  stop_sequences=sequences)
    expected = [first_stop(row, sequences) for row in range(4)]
    assert counts.tolist() == expected and expected[0] <= 3 and expected[2] <= 1
    for row in range(4):
        assert tokens[row, :counts[row]].tolist() == free[row, :counts[row]].tolist()
        assert np.all(tokens[row, counts[row]:] == 0)
    stop_id = int(free[1, 2])
    _, counts = gen.generate(config, params, ids, lengths, images, 8, stop_ids=[stop_id])
    assert counts.tolist() == [first_stop(row, [[stop_id]]) for row in range(4)]
    assert prompting.trim_at_stop_strings("red.\nQ: blue", ["\nQ:", "."]) == "red"
    assert prompting.trim_at_stop_strings("red", ["\nQ:"]) == "red"


def test_eight_device_mesh_gives_the_same_tokens(tiny):
    config, params, prompts, images = tiny
    assert jax.device_count() == 8
    ids, lengths = _right_padded(prompts)
    sampling = gen.Sampling(temperature=1.0, top_k=5, seed=3)
    want_greedy = gen.greedy_generate(config, params, ids, lengths, images, 6)
    want_sampled = gen.generate(config, params, ids, lengths, images, 6, sampling)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    with sharding.rules_context(mesh):
        boxed = jax.eval_shape(lambda: VLM(config).init(jax.random.key(0), **dummy_inputs(config),
                                                        method=VLM.init_all)["params"])
        shardings = sharding.param_shardings(boxed, mesh)
        sharded = jax.device_put(params, shardings)
        assert len(sharded["llm"]["embed"]["embedding"].sharding.device_set) == 8
        got_greedy = gen.greedy_generate(config, sharded, ids, lengths, images, 6)
        got_sampled = gen.generate(config, sharded, ids, lengths, images, 6, sampling)
    for want, got in ((want_greedy, got_greedy), (want_sampled, got_sampled)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def model_directory(tiny_vlm_config, shapes_tokenizer, tmp_path_factory):
    tokenizer = shapes_tokenizer
    config = tiny_vlm_config(vocab_size=tokenizer.vocab_size,
                             image_token_id=tokenizer.image_token_id)
    params = _init(config, 5)
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 6.0
    root = tmp_path_factory.mktemp("cli")
    model_dir.save_model(str(root / "model"), config, nn.unbox(params), tokenizer)
    for name, color in (("red.png", (200, 30, 30)), ("blue.png", (20, 40, 220))):
        Image.new("RGB", (24, 20), color).save(root / name)
    return root


def _run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_cli_generate_single_and_batched_requests_agree(model_directory):
    root = model_directory
    common = ["--checkpoint", str(root / "model"), "--template", "minimal", "--max-new-tokens", "5"]
    singles = [_run_cli(["generate", *common, "--image", str(root / name), "--prompt", prompt])[0]
               for name, prompt in (("red.png", "what color is the circle"), ("blue.png", "a"))]
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps({"image": str(root / n), "prompt": p}) + "\n"
                                for n, p in (("red.png", "what color is the circle"),
                                             ("blue.png", "a"))))
    batched = _run_cli(["generate", *common, "--requests", str(requests)])
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in singles]
    assert [r["completion"] for r in batched] == [r["completion"] for r in singles]
    assert all(len(r["tokens"]) <= 5 for r in batched)
    # the same request through the Python API
    model = vlm_jax.load(str(root / "model"))
    from vlm_jax.inference.requests import request_inputs as _request_inputs
    prompt, image = _request_inputs(model, "minimal", str(root / "red.png"), "what color is the circle")
    tokens, count = gen.generate(model.config, model.params, prompt[None], [len(prompt)],
                                 image[None], 5, stop_ids=[model.tokenizer.eos_id])
    assert singles[0]["tokens"] == tokens[0, :count[0]].tolist()


def test_cli_score_prints_forward_logprobs(model_directory):
    root = model_directory
    [result] = _run_cli(["score", "--checkpoint", str(root / "model"), "--template", "minimal",
                         "--image", str(root / "red.png"), "--prompt", "what color is the circle",
                         "--completion", "red circle"])
    model = vlm_jax.load(str(root / "model"))
    from vlm_jax.inference.requests import request_inputs as _request_inputs
    prompt, image = _request_inputs(model, "minimal", str(root / "red.png"), "what color is the circle")
    completion = model.tokenizer.encode("red circle")
    assert result["tokens"] == completion
    logits = _forward_logits(model, np.concatenate([prompt, completion])[None].astype(np.int32),
                             image[None])[0].astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = log_softmax[len(prompt) - 1:-1][np.arange(len(completion)), completion]
    np.testing.assert_allclose(result["logprobs"], want, atol=1e-5)
    assert result["total"] == pytest.approx(float(want.sum()), abs=1e-4)
