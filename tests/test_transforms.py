"""Per-example transforms: loss mask on answers only (per family, and against transformers'
assistant mask), placeholder expansion, too_long / truncation (whole exchanges, never an image,
one answer cut), prefix-LM mask_ar, captions, contrastive text, text-only LM examples, the
config's choices (too_long, pad_to_square) reaching the transforms."""
import io
import pickle
import types

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import decode_image, normalize_pixels, preprocess_image
from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer, train_word_tokenizer
from vlm_jax.data.transforms import (Chain, DecodeImages, TokenizeCaption, TokenizeContrastive,
                                     TokenizeConversation, TokenizeText, make_transform)
from vlm_jax.models.layers import make_attention_mask

TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ["a large red circle at the top left and a small blue square in the center",
          "what color is the circle? red", "how many objects are there? two objects",
          "USER: ASSISTANT: describe the image", "[INST] [/INST] system user assistant"] * 8
ANSWERS = ["red", "two objects"]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "<image>\nwhat color is the circle?"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "how many objects are there?"},
    {"role": "assistant", "content": ANSWERS[1]},
]
END_OF_TURN = {"llama2": "<eos>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>",
               "chatml": "<|im_end|>", "gemma": "<end_of_turn>", "vicuna": "<eos>"}
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
    return train_word_tokenizer(CORPUS, special_tokens=TEMPLATE_TOKENS)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """Llama-like: SentencePiece with <s>/</s> controls and an added <image>."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=360, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tok = Tokenizer.from_path(str(path))
    tok.add_special_tokens(["<image>"])
    return tok


def _example(conversation=CONVERSATION, num_images=1, image_size=IMAGE_SIZE):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 28, 3), dtype=np.uint8) for _ in range(num_images)]
    raw = {"id": "test:0", "images": images, "conversation": conversation, "caption": None,
           "meta": {}}
    return DecodeImages(image_size).map(raw)


def _target_runs(tokenizer, example):
    """Decoded text of each contiguous run of learned target tokens."""
    mask = example["loss_mask"] > 0
    runs, current = [], []
    for t in range(len(mask)):
        if mask[t]:
            current.append(int(example["target_ids"][t]))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_loss_mask_is_exactly_the_answers(tokenizer, name):
    example = TokenizeConversation(tokenizer, name, num_image_tokens=3, seq_len=256).map(
        _example())
    runs = _target_runs(tokenizer, example)
    assert [r.strip() for r in runs] == [
        f"{a} {END_OF_TURN[name]}" if name == "llama2" else f"{a}{END_OF_TURN[name]}"
        for a in ANSWERS]
    # The unlearned tokens still hold the prompts (nothing was dropped).
    prompt = tokenizer.decode(example["input_ids"][example["loss_mask"] == 0])
    assert "what color is the circle?" in prompt and "how many objects are there?" in prompt


@pytest.mark.parametrize("name", ["llama2", "vicuna"])
def test_loss_mask_with_sentencepiece(sentencepiece_tokenizer, name):
    tok = sentencepiece_tokenizer
    example = TokenizeConversation(tok, name, num_image_tokens=4, seq_len=512).map(_example())
    runs = _target_runs(tok, example)
    expected_eot = " </s>" if name == "llama2" else "</s>"
    assert [r.strip() for r in runs] == [f"{a}{expected_eot}" for a in ANSWERS]
    # Ids are exactly the tokenizer's ids of the whole rendered text (image expanded).
    text = get_template(name).text(CONVERSATION, "<s>", "</s>")
    ids = np.asarray(tok.encode(text))
    expanded = np.repeat(ids, np.where(ids == tok.image_token_id, 4, 1))
    np.testing.assert_array_equal(example["input_ids"], expanded)


QWEN2_GENERATION_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}")
LLAMA3_GENERATION_JINJA = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("name,jinja", [("qwen2", QWEN2_GENERATION_JINJA),
                                        ("llama3", LLAMA3_GENERATION_JINJA)])
def test_matches_transformers_assistant_mask(tokenizer, tmp_path, name, jinja):
    """transformers' own tokenization + {% generation %} mask of the same conversation."""
    from transformers import AutoTokenizer
    tokenizer.save(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf.apply_chat_template(CONVERSATION, chat_template=jinja, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
    example = TokenizeConversation(tokenizer, name, num_image_tokens=1, seq_len=256).map(
        _example())
    np.testing.assert_array_equal(example["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(example["loss_mask"][:-1], expected["assistant_masks"][1:])
    assert example["loss_mask"][-1] == 0


def test_contract_fields(tokenizer):
    example = TokenizeConversation(tokenizer, "qwen2", num_image_tokens=5, seq_len=256).map(
        _example(num_images=1))
    n = len(example["input_ids"])
    assert example["input_ids"].dtype == np.int32 and example["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(example["target_ids"][:-1], example["input_ids"][1:])
    assert example["target_ids"][-1] == 0 and example["loss_mask"][-1] == 0
    np.testing.assert_array_equal(example["positions"], np.arange(n))
    np.testing.assert_array_equal(example["mask_ar"], np.ones(n))
    assert example["images"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_placeholder_expansion(tokenizer):
    conversation = [{"role": "user", "content": "<image> and <image>\nwhat color is the circle?"},
                    {"role": "assistant", "content": "red"}]
    example = TokenizeConversation(tokenizer, "vicuna", num_image_tokens=7, seq_len=256).map(
        _example(conversation, num_images=2))
    is_image = example["input_ids"] == tokenizer.image_token_id
    assert is_image.sum() == 14
    starts = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(int)])) == 1)
    assert len(starts) == 2 and all(is_image[s:s + 7].all() for s in starts)
    assert not (example["loss_mask"] * is_image).any()
    assert example["images"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_image_wrap_tokens_surround_each_image_unlearned_and_uncut():
    """Why: an Idefics3 import's tokenizer writes each image as <fake_token_around_image>
    <global-img> + image tokens + <fake_token_around_image> (Tokenizer.image_wrap): training must
    read that layout, never learn those tokens, and never cut an example between them."""
    from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP
    tok = train_word_tokenizer(CORPUS, special_tokens=TEMPLATE_TOKENS + [
        "<fake_token_around_image>", "<global-img>"])
    tok.image_wrap = IDEFICS3_IMAGE_WRAP
    fake, glob = tok.token_to_id("<fake_token_around_image>"), tok.token_to_id("<global-img>")
    conversation = [{"role": "user", "content": "<image>\nwhat color is the circle?"},
                    {"role": "assistant", "content": "red"}]
    example = TokenizeConversation(tok, "chatml", num_image_tokens=5, seq_len=256).map(
        _example(conversation))
    ids = example["input_ids"]
    first = int(np.flatnonzero(ids == tok.image_token_id)[0])
    assert ids[first - 2:first + 6].tolist() == [fake, glob] + [tok.image_token_id] * 5 + [fake]
    assert (ids == tok.image_token_id).sum() == 5 and (ids == fake).sum() == 2
    assert not example["loss_mask"][first - 2:first + 6].any()
    assert tok.decode(ids[example["loss_mask"] > 0].tolist()).strip().startswith("red")
    # a seq_len ending inside the block (after its image tokens) is too long, never a cut block
    with pytest.raises(SkipExample) as error:
        TokenizeConversation(tok, "chatml", num_image_tokens=5, seq_len=first + 5,
                             truncate=True).map(_example(conversation))
    assert error.value.reason == "too_long"


def test_placeholder_mismatch(tokenizer):
    transform = TokenizeConversation(tokenizer, "qwen2", num_image_tokens=2, seq_len=256)
    with pytest.raises(SkipExample) as error:
        transform.map(_example(num_images=2))
    assert error.value.reason == "placeholder_mismatch"


EXCHANGES = [("how many objects are there?", "two objects"),
             ("what color is the circle?", "a large red circle at the top left"),
             ("describe the image", "a small blue square in the center")]
# system, the image in the first question, then 12 more exchanges of varied lengths.
LONG_CONVERSATION = CONVERSATION[:3] + [
    {"role": role, "content": text} for question, answer in EXCHANGES * 4
    for role, text in (("user", question), ("assistant", answer))]


def _prefix(conversation, num_exchanges):
    """The system turn and the first num_exchanges (user, assistant) pairs."""
    return conversation[:1 + 2 * num_exchanges]


class CountingTokenizer:
    """A tokenizer that counts how many texts it encodes with offsets (one per rendering)."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode_with_offsets(self, text):
        self.calls += 1
        return self._tokenizer.encode_with_offsets(text)


def _expanded_ids(tokenizer, name, conversation, num_image_tokens):
    """The template's text of `conversation`, encoded, each <image> expanded: independent of
    TokenizeConversation."""
    text = get_template(name).text(conversation, tokenizer.bos_token, tokenizer.eos_token)
    ids = np.asarray(tokenizer.encode(text))
    return np.repeat(ids, np.where(ids == tokenizer.image_token_id, num_image_tokens, 1))


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_truncation_keeps_the_longest_prefix_of_whole_exchanges(tokenizer, name):
    num_exchanges = (len(LONG_CONVERSATION) - 1) // 2
    lengths = [0] + [len(_expanded_ids(tokenizer, name, _prefix(LONG_CONVERSATION, k), 16))
                     for k in range(1, num_exchanges + 1)]  # lengths[k]: k exchanges
    assert lengths == sorted(set(lengths))  # strictly growing, so each seq_len has one answer
    for kept in range(1, num_exchanges):
        for seq_len in (lengths[kept], lengths[kept + 1] - 1):  # exact fit, one short of the next
            transform = TokenizeConversation(tokenizer, name, 16, seq_len=seq_len, truncate=True)
            cut = transform.map(_example(LONG_CONVERSATION))
            shorter = TokenizeConversation(tokenizer, name, 16, seq_len=4096).map(
                _example(_prefix(LONG_CONVERSATION, kept)))
            assert cut.keys() == shorter.keys() | {"truncated"} and cut["truncated"] == 1
            for field in shorter:
                np.testing.assert_array_equal(cut[field], shorter[field], err_msg=field)
            np.testing.assert_array_equal(
                cut["input_ids"], _expanded_ids(tokenizer, name, _prefix(LONG_CONVERSATION, kept), 16))
            assert (cut["input_ids"] == tokenizer.image_token_id).sum() == 16
            # Every kept answer is learned whole, end-of-turn token included.
            assert len(_target_runs(tokenizer, cut)) == kept
    fits = TokenizeConversation(tokenizer, name, 16, seq_len=lengths[-1], truncate=True).map(
        _example(LONG_CONVERSATION))
    assert "truncated" not in fits and len(fits["input_ids"]) == lengths[-1]


def test_truncation_is_a_binary_search_over_exchanges(tokenizer):
    conversation = CONVERSATION[:3] + [
        {"role": role, "content": text} for question, answer in EXCHANGES * 13
        for role, text in (("user", question), ("assistant", answer))]  # 40 exchanges
    counting = CountingTokenizer(tokenizer)
    kept_length = len(_expanded_ids(tokenizer, "qwen2", _prefix(conversation, 7), 16))
    cut = TokenizeConversation(counting, "qwen2", 16, seq_len=kept_length, truncate=True).map(
        _example(conversation))
    assert len(cut["input_ids"]) == kept_length
    assert counting.calls <= 1 + 6  # the whole row, then log2(40) prefixes (a scan would be ~33)


def test_truncation_never_drops_an_image(tokenizer):
    # The image is asked about in the third exchange: no prefix without it is a candidate.
    conversation = [CONVERSATION[0]] + [
        {"role": role, "content": text} for question, answer in EXCHANGES * 2
        for role, text in (("user", question), ("assistant", answer))]
    conversation[5] = {"role": "user", "content": "<image>\n" + conversation[5]["content"]}
    three = _expanded_ids(tokenizer, "qwen2", _prefix(conversation, 3), 16)
    two_length = len(_expanded_ids(tokenizer, "qwen2", _prefix(conversation, 2), 16))
    # Room for three exchanges but not four: three are kept, image and all.
    cut = TokenizeConversation(tokenizer, "qwen2", 16, seq_len=len(three), truncate=True).map(
        _example(conversation))
    np.testing.assert_array_equal(cut["input_ids"], three)
    # Room for two exchanges only: they would drop the image, so the third answer is cut instead.
    seq_len = len(three) - 3
    cut = TokenizeConversation(tokenizer, "qwen2", 16, seq_len=seq_len, truncate=True).map(
        _example(conversation))
    np.testing.assert_array_equal(cut["input_ids"], three[:seq_len])
    assert (cut["input_ids"] == tokenizer.image_token_id).sum() == 16 and cut["truncated"] == 1
    # Not even the images and the third question fit (the cut would fall in the image tokens,
    # or leave the question unanswered): too_long, though the two exchanges before would fit.
    last_image = int(np.flatnonzero(three == tokenizer.image_token_id)[-1])
    assert two_length < last_image
    for seq_len in (two_length, last_image, last_image + 3):
        with pytest.raises(SkipExample) as error:
            TokenizeConversation(tokenizer, "qwen2", 16, seq_len=seq_len, truncate=True).map(
                _example(conversation))
        assert error.value.reason == "too_long"


@pytest.mark.parametrize("name", ["qwen2", "vicuna", "llama2"])
def test_a_single_over_long_answer_is_cut_inside_the_answer(tokenizer, name):
    long_answer = " ".join(["a large red circle at the top left"] * 12)
    conversation = CONVERSATION[:2] + [{"role": "assistant", "content": long_answer}]
    full = TokenizeConversation(tokenizer, name, 16, seq_len=4096).map(_example(conversation))
    first_answer = int(np.argmax(full["loss_mask"])) + 1  # input position of the answer's 1st token
    with pytest.raises(SkipExample) as error:  # the default: skip
        TokenizeConversation(tokenizer, name, 16, seq_len=first_answer + 5).map(
            _example(conversation))
    assert error.value.reason == "too_long"
    for seq_len in (first_answer + 1, first_answer + 5):
        cut = TokenizeConversation(tokenizer, name, 16, seq_len=seq_len, truncate=True).map(
            _example(conversation))
        np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:seq_len])
        np.testing.assert_array_equal(cut["loss_mask"][:-1], full["loss_mask"][:seq_len - 1])
        assert cut["loss_mask"][-1] == 0 and cut["loss_mask"].sum() == seq_len - first_answer
        assert (cut["input_ids"] == tokenizer.image_token_id).sum() == 16
        assert cut["truncated"] == 1
    with pytest.raises(SkipExample) as error:  # not one answer token would be left
        TokenizeConversation(tokenizer, name, 16, seq_len=first_answer, truncate=True).map(
            _example(conversation))
    assert error.value.reason == "too_long"


def test_truncated_captions_and_text_keep_every_image_token(tokenizer):
    raw = {"id": "c", "images": [np.zeros((8, 8, 3), np.uint8)], "conversation": None,
           "caption": "a large red circle at the top left and a small blue square in the center",
           "meta": {}}
    full = Chain(DecodeImages(IMAGE_SIZE), TokenizeCaption(tokenizer, 6, 256)).map(raw)
    first_caption = 1 + 6 + len(tokenizer.encode("\n"))  # bos, image tokens, "\n"
    assert full["loss_mask"][first_caption - 1] == 1 and full["loss_mask"][first_caption - 2] == 0
    cut = Chain(DecodeImages(IMAGE_SIZE), TokenizeCaption(tokenizer, 6, 12, truncate=True)).map(raw)
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:12])
    assert cut["truncated"] == 1 and (cut["input_ids"] == tokenizer.image_token_id).sum() == 6
    with pytest.raises(SkipExample) as error:  # the caption would be gone
        Chain(DecodeImages(IMAGE_SIZE), TokenizeCaption(tokenizer, 6, first_caption,
                                                        truncate=True)).map(raw)
    assert error.value.reason == "too_long"
    text = {"id": "t", "images": [], "caption": raw["caption"], "conversation": None, "meta": {}}
    whole = TokenizeText(tokenizer, 256).map(text)
    cut = TokenizeText(tokenizer, 5, truncate=True).map(text)
    np.testing.assert_array_equal(cut["input_ids"], whole["input_ids"][:5])
    assert cut["truncated"] == 1 and cut["loss_mask"].sum() == 4


def test_no_answer_and_malformed(tokenizer):
    transform = TokenizeConversation(tokenizer, "llama3", num_image_tokens=2, seq_len=256)
    empty = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": " "}]
    for conversation, reason in [(empty, "no_answer"), (None, "no_conversation"),
                                 (list(reversed(CONVERSATION[1:3])), "conversation_malformed")]:
        with pytest.raises(SkipExample) as error:
            transform.map(_example(conversation))
        assert error.value.reason == reason


def test_prefix_lm_mask_ar(tokenizer):
    example = TokenizeConversation(tokenizer, "gemma", num_image_tokens=4, seq_len=256,
                                   prefix_lm=True).map(_example())
    first_answer = int(np.argmax(example["loss_mask"])) + 1  # input position of the 1st answer
    np.testing.assert_array_equal(example["mask_ar"][:first_answer], 0)
    np.testing.assert_array_equal(example["mask_ar"][first_answer:], 1)
    mask = np.asarray(make_attention_mask(example["mask_ar"][None]))[0, 0]
    # Image tokens see the prompt after them; nothing in the prefix sees the answer.
    image_positions = np.flatnonzero(example["input_ids"] == tokenizer.image_token_id)
    assert mask[image_positions[0], first_answer - 1]
    assert not mask[:first_answer, first_answer:].any()
    assert mask[first_answer:, :first_answer].all()


def test_caption(tokenizer):
    raw = {"id": "c", "images": [np.zeros((8, 8, 3), np.uint8)], "caption": "a red circle",
           "conversation": None, "meta": {}}
    example = Chain(DecodeImages(IMAGE_SIZE), TokenizeCaption(tokenizer, 3, 64)).map(raw)
    assert _target_runs(tokenizer, example) == ["a red circle<eos>"]
    np.testing.assert_array_equal(example["input_ids"][:5],
                                  [tokenizer.bos_id] + [tokenizer.image_token_id] * 3
                                  + tokenizer.encode("\n"))
    # LLaVA pretraining rows keep the caption in the assistant turn (instruction dropped).
    raw = dict(raw, caption=None, conversation=[
        {"role": "user", "content": "describe the image\n<image>"},
        {"role": "assistant", "content": "a blue square"}])
    example = Chain(DecodeImages(IMAGE_SIZE), TokenizeCaption(tokenizer, 3, 64)).map(raw)
    assert _target_runs(tokenizer, example) == ["a blue square<eos>"]
    assert "describe" not in tokenizer.decode(example["input_ids"])


def test_contrastive(tokenizer):
    raw = {"id": "c", "images": [np.zeros((8, 8, 3), np.uint8)], "caption": "a large red circle",
           "conversation": None, "meta": {}}
    out = Chain(DecodeImages(IMAGE_SIZE), TokenizeContrastive(tokenizer, 8)).map(raw)
    ids = tokenizer.encode("a large red circle")
    np.testing.assert_array_equal(out["text_ids"], ids + [tokenizer.eos_id]
                                  + [tokenizer.pad_id] * (7 - len(ids)))
    short = TokenizeContrastive(tokenizer, 3).map(DecodeImages(IMAGE_SIZE).map(raw))
    np.testing.assert_array_equal(short["text_ids"], ids[:2] + [tokenizer.eos_id])
    assert short["images"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_contrastive_negative_captions(tokenizer):
    raw = {"id": "n", "images": [np.zeros((8, 8, 3), np.uint8)], "caption": "a large red circle",
           "negative_captions": ["a large blue circle", "a large red square at the top", "x"],
           "conversation": None, "meta": {}}
    raw = DecodeImages(IMAGE_SIZE).map(raw)
    out = TokenizeContrastive(tokenizer, 6, negatives=2).map(raw)
    assert out["negative_text_ids"].shape == (2, 6) and out["negative_text_ids"].dtype == np.int32
    for row, text in enumerate(raw["negative_captions"][:2]):
        alone = TokenizeContrastive(tokenizer, 6).map({**raw, "caption": text})
        np.testing.assert_array_equal(out["negative_text_ids"][row], alone["text_ids"])
        assert out["negative_text_lengths"][row] == alone["text_lengths"]
    assert "negative_text_ids" not in TokenizeContrastive(tokenizer, 6).map(raw)
    for bad in ({**raw, "negative_captions": ["one"]}, {**raw, "negative_captions": ["a", " "]},
                {k: v for k, v in raw.items() if k != "negative_captions"}):
        with pytest.raises(SkipExample) as skip:
            TokenizeContrastive(tokenizer, 6, negatives=2).map(bad)
        assert skip.value.reason == "no_negative_captions"


def test_text_only(tokenizer):
    raw = {"id": "t", "images": [], "caption": "what color is the circle? red",
           "conversation": None, "meta": {}}
    example = TokenizeText(tokenizer, 64).map(raw)
    ids = [tokenizer.bos_id] + tokenizer.encode("what color is the circle? red") + [tokenizer.eos_id]
    np.testing.assert_array_equal(example["input_ids"], ids)
    np.testing.assert_array_equal(example["loss_mask"], [1.0] * (len(ids) - 1) + [0.0])
    assert "images" not in example
    with pytest.raises(SkipExample) as error:
        TokenizeText(tokenizer, 4).map(raw)
    assert error.value.reason == "too_long"
    # A text-only conversation, rendered with a template, with no image.
    raw = dict(raw, caption=None, conversation=CONVERSATION[3:])
    example = TokenizeText(tokenizer, 64, "qwen2").map(raw)
    assert tokenizer.decode(example["input_ids"], False).startswith("<|im_start|>system")


def test_decode_images_matches_images_module():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = DecodeImages(24).map({"images": [buffer.getvalue(), pixels]})["images"]
    assert out.shape == (2, 24, 24, 3) and out.dtype == np.uint8  # normalised on the device
    for image in out:
        np.testing.assert_array_equal(normalize_pixels(image),
                                      preprocess_image(decode_image(pixels), 24))
    empty = DecodeImages(24).map({"images": []})["images"]
    assert empty.shape == (0, 24, 24, 3) and empty.dtype == np.uint8


def test_undecoded_images_are_refused(tokenizer):
    raw = {"id": "x", "images": [b"bytes"], "conversation": CONVERSATION, "caption": None}
    with pytest.raises(ValueError, match="DecodeImages"):
        TokenizeConversation(tokenizer, "qwen2", 2, 64).map(raw)


@pytest.mark.parametrize("task", ["instruct", "align", "lm", "contrastive"])
def test_make_transform_per_task_and_pickles(tokenizer, task):
    cfg = types.SimpleNamespace(task=task, template="qwen2", seq_len=128, image_size=IMAGE_SIZE,
                                num_image_tokens=4, text_len=8, too_long="skip",
                                pad_to_square=False)
    transform = pickle.loads(pickle.dumps(make_transform(cfg, tokenizer)))
    raw = {"id": "m", "images": [np.zeros((8, 8, 3), np.uint8)] if task != "lm" else [],
           "conversation": CONVERSATION if task != "lm" else CONVERSATION[3:],
           "caption": "a red circle" if task in ("align", "contrastive") else None, "meta": {}}
    out = transform(raw)
    assert ("text_ids" in out) == (task == "contrastive")
    assert ("input_ids" in out) == (task != "contrastive")
