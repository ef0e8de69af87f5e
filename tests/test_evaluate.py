"""Evaluation: answer normalisation and scoring, baselines, the shapes VQA set, prompts, and the
greedy generator checked against a step-by-step recomputation with the plain model forward."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data.images import preprocess_image
from vlm_jax.eval import vqa as evaluate
from vlm_jax.inference import batching
from vlm_jax.inference import prompts as prompting
from vlm_jax.inference.generate import generate
from vlm_jax.data.sources import shapes
from vlm_jax.inference.generate import greedy_generate
from vlm_jax.models.vlm import VLM, init_params


@pytest.mark.parametrize("text, expected", [
    ("Red", "red"), ("  the red. ", "red"), ("Two", "2"), ("top-left", "top left"),
    ("a  large\tCircle!", "large circle"), ("0", "0"), ("none", "0"), ("yes.", "yes"),
    # the official VQA rules: a mark touching a space is deleted, elsewhere it becomes a space
    ("yes, it is", "yes it is"), ("hello-world,foo", "hello world foo"), ("(a) dog", "dog"),
    # ... and every mark is deleted once the answer holds a digit-comma-digit
    ("3,000", "3000"), ("1,2-3", "123"),
    # periods go unless a digit follows; marks outside the list (' : $ %) stay
    ("3.5", "3.5"), ("2.", "2"), ("e.g. cat", "eg cat"), ("5:30", "5:30"), ("it's", "it's"),
    ("50%", "50%"),
    # contractions written without apostrophes are restored
    ("dont", "don't"), ("Isnt", "isn't"), ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"), ("don't", "don't"),
    ("line\nbreak", "line break")])
def test_normalize_answer(text, expected):
    assert evaluate.normalize_answer(text) == expected


def test_box_answers_are_recognised():
    assert evaluate.is_box_answer(" [1, 20, 300, 4000] ")
    assert not evaluate.is_box_answer("the box [1, 2, 3, 4]")
    assert not evaluate.is_box_answer("[1, 2, 3]")


def test_box_iou_matches_pixel_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (np.sort(rng.integers(0, 60, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
                for _ in range(2))
        grid_a, grid_b = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
        grid_a[a[1]:a[3], a[0]:a[2]] = True
        grid_b[b[1]:b[3], b[0]:b[2]] = True
        union = (grid_a | grid_b).sum()
        expected = (grid_a & grid_b).sum() / union if union else 0.0
        assert evaluate.box_iou(a, b) == pytest.approx(expected)


def test_is_correct_exact_and_grounding():
    assert evaluate.is_correct("The Red", "red", "color")
    assert not evaluate.is_correct("reddish", "red", "color")
    assert evaluate.is_correct("[100, 100, 300, 300]", "[110, 100, 310, 300]", "grounding")
    assert not evaluate.is_correct("[100, 100, 200, 200]", "[150, 150, 350, 350]", "grounding")
    assert not evaluate.is_correct("a box", "[0, 0, 10, 10]", "grounding")


def _item(question_type, answer, index=0):
    return evaluate.VQAItem(np.zeros((4, 4, 3), np.uint8), "q?", answer, question_type, str(index))


def test_accuracy_tables_and_majority():
    items = [_item("color", "red"), _item("color", "blue"), _item("count", "2"),
             _item("count", "2"), _item("count", "0")]
    table = evaluate.accuracy_by_type(items, ["Red", "green", "two", "2", "1"])
    assert table == {"color": (1, 2), "count": (2, 3)}
    assert evaluate.mean_accuracy(table) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert evaluate.mean_accuracy(table, ["count", "position"]) == pytest.approx(2 / 3)
    majority = evaluate.majority_baseline(items)
    assert majority == {"color": "red", "count": "2"}
    assert evaluate.majority_predictions(items, majority) == ["red", "red", "2", "2", "2"]
    text = evaluate.format_table({"model": table, "majority": table}, ["color", "count"])
    assert "overall (2 core)" in text and "66.7%" in text
    with pytest.raises(ValueError, match="predictions"):
        evaluate.accuracy_by_type(items, ["red"])


def test_shapes_items_share_scenes_across_types():
    items = evaluate.shapes_vqa_items("test", 5, 16, ("color", "count", "position"))
    by_type = collections.defaultdict(list)
    for item in items:
        by_type[item.question_type].append(item)
    assert {t: len(v) for t, v in by_type.items()} == {"color": 5, "count": 5, "position": 5}
    for color_item, count_item in zip(by_type["color"], by_type["count"]):
        np.testing.assert_array_equal(color_item.image, count_item.image)
    source = shapes.ShapesSource("test", image_size=16, turns_per_example=1,
                                 question_types=("position",))
    assert [i.answer for i in by_type["position"]] == [source.sample(k)[1][0][2] for k in range(5)]
    assert all(i.answer in shapes.POSITIONS for i in by_type["position"])


@pytest.fixture(scope="module")
def tokenizer(shapes_tokenizer):
    """The tokenizer configs/tiny.py runs fit (conftest)."""
    return shapes_tokenizer


@pytest.fixture(scope="module")
def tiny_vlm(tiny_vlm_config, tokenizer):
    config = tiny_vlm_config(vocab_size=tokenizer.vocab_size,
                             image_token_id=tokenizer.image_token_id,
                             vision=dict(posemb="sincos2d"))  # fixed 2D positions: no table
    return config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))


def test_prompt_ids_minimal_template(tokenizer):
    ids = prompting.prompt_ids(tokenizer, "what color is the circle?", "minimal", 3)
    image = tokenizer.image_token_id
    assert list(ids[:4]) == [tokenizer.bos_id, image, image, image]
    assert tokenizer.decode(ids[4:]) == "\nwhat color is the circle?\n"


def test_conversation_prompt_is_the_training_prefix_of_its_answer(tokenizer):
    """The eval prompt of turn k is token for token what training fed before answer k."""
    from vlm_jax.data.transforms import TokenizeConversation
    conversation = [{"role": "user", "content": "<image>\nwhat color is the circle?"},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "how many objects are there?"},
                    {"role": "assistant", "content": "2"}]
    example = TokenizeConversation(tokenizer, "minimal", 3, 64).map(
        {"id": "x", "conversation": conversation, "images": np.zeros((1, 4, 4, 3), np.float32)})
    # loss_mask[p] = 1 where position p predicts a target (answer or EOS) token p + 1: each run
    # of ones starts one position before its answer
    mask = example["loss_mask"] > 0
    run_starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(run_starts) == 2
    for turn, answer_start in ((1, run_starts[0] + 1), (2, run_starts[1] + 1)):
        prompt = prompting.conversation_prompt_ids(tokenizer, conversation[:2 * turn - 1],
                                                  "minimal", 3)
        np.testing.assert_array_equal(prompt, example["input_ids"][:answer_start])
    with pytest.raises(ValueError, match="empty answer"):
        prompting.conversation_prompt_ids(_NoEos(tokenizer), conversation[:1], "minimal", 3)


class _NoEos:
    """A tokenizer without an EOS token: the minimal template writes nothing for an empty answer."""
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token = None

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _reference_greedy(config, params, ids, length, image, max_new_tokens, stop):
    """Greedy decoding by re-running the whole model (VLM.__call__: image encode, splice, decoder)
    on the growing sequence, one token at a time. The sequence sits in a fixed-size buffer (one
    compile); the tokens after it cannot affect it under the causal mask."""
    size = len(ids) + max_new_tokens
    forward = jax.jit(lambda p, t, img: VLM(config).apply(
        {"params": p}, t, img, jnp.arange(size, dtype=jnp.int32)[None], jnp.ones_like(t)))
    sequence, out = np.zeros((1, size), np.int32), []
    sequence[0, :length] = ids[:length]
    for step in range(max_new_tokens):
        logits = forward(params, jnp.asarray(sequence), jnp.asarray(image)[None])
        token = int(jnp.argmax(logits[0, length + step - 1]))
        if token == stop:
            break
        out.append(token)
        sequence[0, length + step] = token
    return out


def test_greedy_generate_matches_full_recomputation(tiny_vlm, tokenizer):
    config, params = tiny_vlm
    rng = np.random.default_rng(0)
    prompts = [prompting.prompt_ids(tokenizer, q, "minimal", config.tokens_per_image)
               for q in ("what color is the circle?", "how many objects are there?")]
    width = max(map(len, prompts)) + 2
    ids = np.zeros((2, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    images = rng.uniform(-1, 1, (2, 1, 16, 16, 3)).astype(np.float32)
    # A stop id the random model emits at some point, so rows stop at different steps.
    free, _ = greedy_generate(config, params, ids, lengths, images, 6)
    stop = int(free[0, 2])
    tokens, counts = greedy_generate(config, params, ids, lengths, images, 6, stop_ids=[stop])
    for row in range(2):
        expected = _reference_greedy(config, params, ids[row], lengths[row], images[row], 6, stop)
        assert list(tokens[row, :counts[row]]) == expected
        assert np.all(tokens[row, counts[row]:] == 0)
    assert counts[0] <= 2


def test_predict_answers_decodes_generation_and_blanks_images(tiny_vlm, tokenizer, monkeypatch):
    config, params = tiny_vlm
    items = evaluate.shapes_vqa_items("test", 3, 16, ("color", "exists"))
    seen_images = []

    def recording_generate(*args, **kwargs):
        seen_images.append(np.array(args[4]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(batching, "generate", recording_generate)
    answers = evaluate.predict_answers(config, params, tokenizer, items, "minimal", batch_size=4,
                                       max_new_tokens=3)
    blank = evaluate.predict_answers(config, params, tokenizer, items, "minimal", batch_size=4,
                                     max_new_tokens=3, blank_images=True)
    assert len(answers) == len(blank) == len(items)
    assert len(seen_images) == 4  # 6 items in batches of 4, twice
    assert all(np.abs(batch).max() > 0.1 for batch in seen_images[:2])
    assert all(np.all(batch == 0) for batch in seen_images[2:])
    # The answer strings are the decoded generations of each item's own prompt.
    prompt = prompting.prompt_ids(tokenizer, items[4].question, "minimal", config.tokens_per_image)
    image = preprocess_image(items[4].image, 16)[None, None]
    tokens, counts = greedy_generate(config, params, prompt[None], np.array([len(prompt)]), image,
                                     3, [tokenizer.eos_id])
    assert answers[4] == tokenizer.decode(tokens[0, :counts[0]]).strip()


def test_predict_answers_equal_the_full_recomputation_path(tiny_vlm, tokenizer):
    """The cached generator behind predict_answers gives the answers that the earlier evaluator
    (greedy decoding by re-running the whole model each step) gave."""
    config, params = tiny_vlm
    items = evaluate.shapes_vqa_items("test", 2, 16, ("color", "count", "position"))
    answers = evaluate.predict_answers(config, params, tokenizer, items, "minimal", batch_size=4,
                                       max_new_tokens=4)
    assert any(answers)  # a random model still says something, so the comparison has teeth
    for item, answer in zip(items, answers):
        prompt = prompting.prompt_ids(tokenizer, item.question, "minimal", config.tokens_per_image)
        image = preprocess_image(item.image, 16)[None]
        expected = _reference_greedy(config, params, prompt, len(prompt), image, 4,
                                     tokenizer.eos_id)
        assert answer == tokenizer.decode(expected).strip()
