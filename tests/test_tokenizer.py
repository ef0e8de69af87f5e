"""Tokenizer interface: tokenizer.json and SentencePiece backends, special tokens, save/reload,
and agreement with transformers on the saved tokenizer.json."""
import io
import json
import os

import pytest
import sentencepiece as spm

from vlm_jax.data.tokenizer import Tokenizer, train_word_tokenizer

CORPUS = [
    "a large red circle at the top left and a small blue square in the center",
    "what color is the circle? red",
    "how many objects are there? 2",
    "give the box of the red circle [120, 340, 560, 780]",
    "is there a green triangle at the bottom right? no",
] * 8


@pytest.fixture(scope="module")
def word_tokenizer():
    return train_word_tokenizer(CORPUS, special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    """A Llama-like SentencePiece BPE: identity normalisation, byte fallback, <s>/</s> controls."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=360, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_word_tokenizer_round_trip_and_reserved_ids(word_tokenizer):
    tok = word_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_token_id) == (0, 1, 2, 3, 4)
    for text in ["what color is the circle?", "[120, 340, 560, 780]", "unseen words: zebra!"]:
        assert tok.decode(tok.encode(text)) == text
    # On the closed vocabulary the merges reach whole words.
    assert len(tok.encode("a large red circle")) == 4


def test_special_tokens_are_single_ids(word_tokenizer):
    tok = word_tokenizer
    ids = tok.encode("<bos><image>\nwhat color is the circle?<|im_end|>")
    assert ids[:2] == [tok.bos_id, tok.image_token_id]
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert ids.count(tok.image_token_id) == 1
    assert tok.decode(ids) == "\nwhat color is the circle?"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<bos><image>\n")


def test_offsets_cover_text(word_tokenizer):
    text = "<image>\nhow many objects are there? 2<eos>"
    ids, offsets = word_tokenizer.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert "".join(text[a:b] for a, b in offsets) == text


def test_add_special_tokens_grows_vocab(word_tokenizer, tmp_path):
    tok = Tokenizer.from_path(_saved(word_tokenizer, tmp_path / "a"))
    size = tok.vocab_size
    new_ids = tok.add_special_tokens(["<box>", "<image>", "<box>"])
    assert new_ids == [size, tok.image_token_id, size]
    assert tok.vocab_size == size + 1
    assert tok.encode("the<box>circle") == tok.encode("the") + [size] + tok.encode("circle")


def test_save_reload_and_transformers_agree(word_tokenizer, tmp_path):
    from transformers import AutoTokenizer
    directory = _saved(word_tokenizer, tmp_path / "tok")
    reloaded = Tokenizer.from_path(directory)
    text = "<bos><image>\ngive the box of the red circle [120, 340, 560, 780]<eos>"
    assert reloaded.encode(text) == word_tokenizer.encode(text)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (1, 2, 0)
    hf = AutoTokenizer.from_pretrained(directory)
    assert hf(text, add_special_tokens=False)["input_ids"] == word_tokenizer.encode(text)
    assert hf.convert_tokens_to_ids("<image>") == word_tokenizer.image_token_id
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_bare_tokenizer_json_guesses_special_tokens(word_tokenizer, tmp_path):
    directory = _saved(word_tokenizer, tmp_path / "bare")
    os.remove(os.path.join(directory, "tokenizer_config.json"))
    os.remove(os.path.join(directory, "special_tokens_map.json"))
    tok = Tokenizer.from_path(os.path.join(directory, "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_config_null_means_no_token(word_tokenizer, tmp_path):
    directory = _saved(word_tokenizer, tmp_path / "nobos")
    path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(path))
    config["bos_token"] = None  # Qwen2 style
    json.dump(config, open(path, "w"))
    assert Tokenizer.from_path(directory).bos_id is None


def test_sentencepiece_backend(sentencepiece_path, tmp_path):
    tok = Tokenizer.from_path(sentencepiece_path)
    processor = spm.SentencePieceProcessor(model_file=sentencepiece_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    text = "what color is the circle? red"
    assert tok.encode(text) == processor.encode(text)
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="add_special_tokens"):
        tok.image_token_id
    (image_id,) = tok.add_special_tokens(["<image>"])
    assert image_id == processor.get_piece_size() == tok.vocab_size - 1
    # Control symbols and added tokens written as text are one id each.
    ids = tok.encode("<s><image>\nhow many objects are there?</s>")
    assert ids[:2] == [1, image_id] and ids[-1] == 2
    assert ids[2:-1] == processor.encode("\nhow many objects are there?")
    assert tok.decode(ids) == "\nhow many objects are there?"
    ids, offsets = tok.encode_with_offsets("é<image> red")
    assert ids[ids.index(image_id) + 1:] == processor.encode(" red")
    assert offsets[ids.index(image_id)] == (1, 8)
    # Save -> reload keeps the added token (written as HF's added_tokens_decoder).
    directory = str(tmp_path / "sp_saved")
    tok.save(directory)
    reloaded = Tokenizer.from_path(directory)
    assert reloaded.image_token_id == image_id
    assert reloaded.encode("<s><image>\nred</s>") == tok.encode("<s><image>\nred</s>")


def test_unsupported_file_raises(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\n")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_path(str(path))
    with pytest.raises(ValueError, match="neither"):
        Tokenizer.from_path(str(tmp_path))


def _saved(tokenizer, directory) -> str:
    tokenizer.save(str(directory))
    return str(directory)
