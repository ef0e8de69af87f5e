"""Tokenizer interface: tokenizer.json and SentencePiece backends, special tokens, save/reload,
agreement with transformers on the saved files (ids, one BOS, the chat template kept)."""
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

from vlm_jax.data.templates import get_template
from vlm_jax.data.tokenizer import Tokenizer, train_word_tokenizer
from vlm_jax.errors import DataError

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


# ---------------------------------------------------------------------- decoder families' files

# Stand-ins for three families' HF tokenizer files: their special tokens, their config's roles and
# post_processor (Llama 3 and Gemma prepend BOS there, as the real tokenizer.json files do), and
# a chat template stored the three ways transformers reads one.
FAMILIES = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                   roles={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                   byte_level=True, template_in="config_list"),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  roles={"bos_token": None, "eos_token": "<|im_end|>",
                         "pad_token": "<|endoftext|>"},
                  byte_level=True, template_in="config_string"),
    "gemma": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                            "<end_of_turn>"],
                  roles={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                         "unk_token": "<unk>"},
                  byte_level=False, template_in="jinja_file"),
}
FAMILY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
QUESTION = [{"role": "user", "content": "<image>\nwhat color is the circle?"}]


def _family_dir(family: str, directory) -> str:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as the family's repo has."""
    spec = FAMILIES[family]
    bos = spec["roles"]["bos_token"]
    if spec["byte_level"]:  # Llama 3 / Qwen2: byte-level BPE
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    else:  # Gemma: spaces become "▁", no pre-tokenizer
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
        tok.decoder = tokenizers.decoders.Replace("▁", " ")
        alphabet = []
    tok.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=spec["specials"], initial_alphabet=alphabet,
        show_progress=False))
    byte_level = tokenizers.processors.ByteLevel(trim_offsets=False)
    if bos is None:
        tok.post_processor = byte_level
    else:
        add_bos = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = (tokenizers.processors.Sequence([byte_level, add_bos])
                              if spec["byte_level"] else add_bos)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = dict(spec["roles"], add_bos_token=bos is not None,
                  tokenizer_class="PreTrainedTokenizerFast")
    if spec["template_in"] == "config_string":
        config["chat_template"] = FAMILY_CHAT_TEMPLATE
    elif spec["template_in"] == "config_list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                   {"name": "default", "template": FAMILY_CHAT_TEMPLATE}]
    else:  # the file wins over a config key, in transformers and here
        config["chat_template"] = "{{ 'stale' }}"
        with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
            f.write(FAMILY_CHAT_TEMPLATE)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def _imported(family: str, tmp_path) -> Tokenizer:
    """The family's tokenizer as our importer leaves it: loaded, with <image> added."""
    tok = Tokenizer.from_path(_family_dir(family, tmp_path / f"{family}_hub"))
    tok.add_special_tokens([tok.image_token])
    return tok


def _prompt(template: str, tok: Tokenizer) -> str:
    """Our prompt for QUESTION: the text before the answer, as vlm-jax generate builds it."""
    pieces = get_template(template).render(QUESTION + [{"role": "assistant", "content": ""}],
                                           tok.bos_token, tok.eos_token)
    last_target = max(i for i, (_, is_target) in enumerate(pieces) if is_target)
    return "".join(text for text, _ in pieces[:last_target])


@pytest.mark.parametrize("family", ["gemma", "llama3"])
def test_family_files_add_bos_themselves(family, tmp_path):
    """The stand-ins are faithful: transformers on the family's own files prepends BOS to a
    prompt that starts with one (the double BOS that `save` must not write)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(_family_dir(family, tmp_path / "hub"))
    bos = FAMILIES[family]["roles"]["bos_token"]
    assert hf(bos)["input_ids"] == [hf.bos_token_id] * 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_family_tokenizer_gives_our_ids_and_one_bos(family, tmp_path):
    from transformers import AutoTokenizer
    tok = _imported(family, tmp_path)
    directory = _saved(tok, tmp_path / "export")
    hf = AutoTokenizer.from_pretrained(directory)
    prompt = _prompt(family, tok)
    ours = tok.encode(prompt)
    assert hf(prompt)["input_ids"] == ours
    if tok.bos_token is not None:
        assert prompt.startswith(tok.bos_token) and ours.count(tok.bos_id) == 1
    # A transformers user with the template's jinja gets the same ids.
    tok.chat_template = get_template(family).jinja
    hf = AutoTokenizer.from_pretrained(_saved(tok, directory))
    assert hf.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"] == ours


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llava_processor_gives_one_bos(family, tmp_path):
    """As the exporter builds it: our files, then a LlavaProcessor over them, saved and reloaded
    (transformers re-saves the tokenizer files its own way)."""
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor, SiglipImageProcessor
    tok = _imported(family, tmp_path)
    tok.chat_template = get_template(family).jinja
    directory = _saved(tok, tmp_path / "export")
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(),
                               tokenizer=AutoTokenizer.from_pretrained(directory),
                               patch_size=56, image_token=tok.image_token,
                               num_additional_image_tokens=0,
                               vision_feature_select_strategy="full")
    processor.save_pretrained(directory)
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    prompt = _prompt(family, tok)
    ours = np.array(tok.encode(prompt))
    num_image_tokens = (224 // 56) ** 2  # SiglipImageProcessor's default 224 x 224
    expected = np.repeat(ours, np.where(ours == tok.image_token_id, num_image_tokens, 1))
    for each in (processor, AutoProcessor.from_pretrained(directory)):
        ids = list(each(text=prompt, images=image)["input_ids"][0])
        assert ids == expected.tolist()
        if tok.bos_token is not None:
            assert ids.count(tok.bos_id) == 1
    items = [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "what color is the circle?"}]}]
    reloaded = AutoProcessor.from_pretrained(directory)
    assert reloaded.apply_chat_template(items, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_kept_through_save(family, tmp_path):
    from transformers import AutoTokenizer
    tok = _imported(family, tmp_path)
    assert tok.chat_template == FAMILY_CHAT_TEMPLATE
    directory = _saved(tok, tmp_path / "export")
    assert Tokenizer.from_path(directory).chat_template == FAMILY_CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(directory).chat_template == FAMILY_CHAT_TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        assert "chat_template" not in json.load(f)  # one place: chat_template.jinja


def test_chat_template_replaced_then_removed(word_tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tok = Tokenizer.from_path(_saved(word_tokenizer, tmp_path / "a"))
    assert tok.chat_template is None
    tok.chat_template = get_template("minimal").jinja
    directory = _saved(tok, tmp_path / "b")
    hf = AutoTokenizer.from_pretrained(directory)
    assert hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == (
        _prompt("minimal", tok))
    tok.chat_template = None  # saving over it again leaves no stale template behind
    assert AutoTokenizer.from_pretrained(_saved(tok, directory)).chat_template is None


def test_chat_template_list_without_default_raises(word_tokenizer, tmp_path):
    directory = _saved(word_tokenizer, tmp_path / "tok")
    path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(path))
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"}]
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="none 'default'"):
        Tokenizer.from_path(directory)


def test_saved_sentencepiece_adds_no_bos(sentencepiece_path, tmp_path):
    """A tokenizer.model directory: transformers reads add_bos_token from the config (which a
    tokenizer.json directory ignores); ours says false."""
    from transformers import AutoTokenizer
    directory = _saved(Tokenizer.from_path(sentencepiece_path), tmp_path / "sp")
    hf = AutoTokenizer.from_pretrained(directory)
    text = "<s>what color is the circle?"
    assert hf(text)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"]
    assert hf(text)["input_ids"].count(1) == 1


def _saved(tokenizer, directory) -> str:
    tokenizer.save(str(directory))
    return str(directory)


def test_image_wrap_is_saved_loaded_and_only_special_tokens(tmp_path):
    """Why: an Idefics3 import writes each image as <fake_token_around_image><global-img> +
    image tokens + <fake_token_around_image>; the layout must survive save / load (training,
    generate and the export read it from the model directory) and must be special tokens, whose
    ids do not depend on the text around them."""
    from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP
    tok = train_word_tokenizer(CORPUS, special_tokens=["<fake_token_around_image>",
                                                       "<global-img>"])
    assert tok.image_wrap == ("", "")
    with pytest.raises(DataError, match="not made of the tokenizer's special tokens"):
        tok.image_wrap = ("red", "")
    with pytest.raises(DataError, match=r"\(before, after\)"):
        tok.image_wrap = ("<global-img>",)
    tok.image_wrap = IDEFICS3_IMAGE_WRAP
    tok.save(str(tmp_path))
    again = Tokenizer.from_path(str(tmp_path))
    assert again.image_wrap == IDEFICS3_IMAGE_WRAP
    fake, glob, image = (again.token_to_id(t) for t in ("<fake_token_around_image>",
                                                        "<global-img>", "<image>"))
    ids = again.encode("red <image> blue <image>")
    new, source, is_image = again.expand_images(ids, 3)
    block = [fake, glob, image, image, image, fake]
    assert ids.count(image) == 2
    assert new.tolist() == [t for i in ids for t in (block if i == image else [i])]
    assert new[is_image].tolist() == [image] * 6 and is_image.sum() == 6
    # source: where each new id comes from (its block's <image> for the wrap tokens too)
    in_block = np.asarray(ids)[source] == image
    assert in_block.sum() == 2 * len(block)
    assert np.array_equal(new[~in_block], np.asarray(ids)[source[~in_block]])
    # a tokenizer saved without a wrap loads bare (LLaVA, PaliGemma)
    tok.image_wrap = ("", "")
    tok.save(str(tmp_path / "bare"))
    assert Tokenizer.from_path(str(tmp_path / "bare")).image_wrap == ("", "")
    assert "vlm_jax_image_wrap" not in open(tmp_path / "bare" / "tokenizer_config.json").read()
