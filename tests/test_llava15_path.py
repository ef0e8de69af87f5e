"""The path a LLaVA-1.5 user walks, end to end at tiny scale: compose SigLIP + an instruction LLM
(Qwen2, Llama 3) with `import-hf`, train `configs/llava15_siglip.py` align -> instruct on a small
LLaVA-format set with real-looking rows (multi-turn, text-only, `<image>` after the question, an
over-long row, non-square images), export with `export-hf`, and answer the same question in
transformers (AutoProcessor + apply_chat_template + generate) as `vlm-jax generate` does: the
same greedy tokens, stopping at the same end-of-turn token."""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlm_jax.cli import main as cli_main

CONFIG = "configs/llava15_siglip.py"
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
# family -> (special tokens, bos, eos, its own chat template (kept by the import))
FAMILIES = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>",
              "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"),
}


def _corpus():
    words = COLORS + SHAPES + ["What", "colour", "is", "the", "shape", "Describe", "image", "A",
                               "a", "on", "grey", "Tell", "me", "story", "You", "are", "helpful",
                               "assistant", "system", "user", "Thanks", "welcome", "more"]
    return [" ".join(words), "What colour is the shape? What is the shape? A red circle."] * 4


def _save_llm(hf_tiny, directory, family):
    """A tiny instruct LLM of `family` with a byte-level BPE tokenizer carrying the family's
    special tokens, its BOS post-processor (Llama 3 prepends <|begin_of_text|>), its chat
    template and a generation config."""
    specials, bos, eos, chat_template = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    config = hf_tiny.text(family, tie=True)
    config.vocab_size = tok.get_vocab_size()
    config.eos_token_id = tok.token_to_id(eos)
    config.bos_token_id = tok.token_to_id(bos) if bos else None
    torch.manual_seed(0)
    model_class = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}
    model_class[family](config).save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": None, "chat_template": chat_template,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def _write_data(root):
    """Non-square photos-of-shapes, a LLaVA-Pretrain-style caption JSON and a 665K-style
    instruct JSON (multi-turn, text-only, <image> after the question, subfolder, one row whose
    answer alone is longer than seq_len, one conversation too long to keep whole)."""
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    captions, rows = [], []
    for i in range(16):
        color, shape = COLORS[i % 4], SHAPES[(i // 4) % 4]
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
               "yellow": (230, 220, 30)}[color]
        pixels = np.full(size[::-1] + (3,), 128, np.uint8)
        pixels[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = rgb
        name = f"sub/{i:02d}.png" if i % 5 == 0 else f"{i:02d}.png"
        Image.fromarray(pixels).save(root / "images" / name)
        captions.append({"id": f"c{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A {color} {shape} on grey."}]})
        question = ("What colour is the shape?\n<image>" if i % 3 == 0
                    else "<image>\nWhat colour is the shape?")
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": color},
                 {"from": "human", "value": "What is the shape?"}, {"from": "gpt", "value": shape}]
        if i == 7:  # too long to keep whole: truncated at a turn boundary
            turns += [{"from": "human", "value": "Tell me more. " * 20},
                      {"from": "gpt", "value": "more " * 40}]
        rows.append({"id": f"q{i}", "image": name, "conversations": turns})
    rows.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "You are welcome"}]})
    rows.append({"id": "long-answer", "image": "01.png", "conversations": [
        {"from": "human", "value": "<image>\nTell me a story."},
        {"from": "gpt", "value": "a red circle " * 200}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(rows))


def _train(tmp, phase, model, data, workdir, *overrides):
    arg = (f"phase={phase},model={model},data={tmp / data},images={tmp / 'images'},"
           f"seq_len=128,batch=8,examples_per_row=1")
    assert cli_main(["train", "--config", f"{CONFIG}:{arg}", "--workdir", str(workdir),
                     "--config.mesh.data=-1", "--config.mesh.fsdp=1",
                     "--config.log.progress_bar=False", "--config.log.tensorboard=False",
                     "--config.checkpoint.async_save=False", *overrides]) == 0
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_llava15_recipe_align_instruct_export_generate(hf_tiny, tmp_path, family, capsys):
    torch.manual_seed(0)
    transformers.SiglipVisionModel(hf_tiny.vision()).save_pretrained(tmp_path / "siglip")
    _save_llm(hf_tiny, tmp_path / "llm", family)
    _write_data(tmp_path)
    assert cli_main(["import-hf", "--vision", str(tmp_path / "siglip"), "--text",
                     str(tmp_path / "llm"), "--out", str(tmp_path / "base")]) == 0

    # align: one epoch of 16 captions, every one trained on once; bf16 compute (the recipe's)
    rows = _train(tmp_path, "align", tmp_path / "base", "captions.json", tmp_path / "align")
    assert rows[-1]["examples_seen"] == 16 and rows[-1]["epoch"] == 1.0
    assert sum(r["num_examples"] for r in rows if "num_examples" in r) == 16
    # instruct: 40 epochs at a high lr so the tiny model learns to end its answers
    rows = _train(tmp_path, "instruct", tmp_path / "align", "instruct.json", tmp_path / "instruct",
                  "--config.train.epochs=40", "--config.train.optimizer.learning_rate=3e-3")
    last = rows[-1]
    assert last["examples_seen"] == 40 * 18 and last["epoch"] == 40.0
    # two rows cut to fit, every epoch (a cut is counted each time it is trained on), none skipped
    assert last["data/truncated"] == 2 * 40 and not any(k.startswith("data/skipped") for k in last)
    saved = json.loads((tmp_path / "instruct" / "model" / "config.json").read_text())
    assert saved["model"]["dtype"] is None and saved["trained_with"]["dtype"] == "bfloat16"
    assert saved["data"] == {"template": {"qwen2": "qwen2", "llama": "llama3"}[family],
                             "pad_to_square": True, "prefix_lm": False}

    # the import kept the LLM's own chat template and generation config
    from vlm_jax.data.tokenizer import Tokenizer as OurTokenizer
    assert OurTokenizer.from_path(str(tmp_path / "base" / "tokenizer")).chat_template == \
        FAMILIES[family][3]
    assert json.loads((tmp_path / "base" / "generation_config.json").read_text())[
        "eos_token_id"] is not None

    # eval reads the model from --checkpoint: the recipe's argument needs no model=
    arg = f"phase=instruct,data={tmp_path / 'instruct.json'},images={tmp_path / 'images'}"
    assert cli_main(["eval", "--config", f"{CONFIG}:{arg}", "--checkpoint",
                     str(tmp_path / "instruct"), "--num-examples", "4", "--batch-size", "4",
                     "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["num_examples"] == 4

    capsys.readouterr()
    assert cli_main(["export-hf", "--checkpoint", str(tmp_path / "instruct"),
                     "--out", str(tmp_path / "hf")]) == 0
    assert "the same greedy answer" in capsys.readouterr().out  # the self-check asked too

    image, question = tmp_path / "images" / "03.png", "What colour is the shape?"
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "instruct"), "--image",
                     str(image), "--prompt", question, "--max-new-tokens", "12"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]

    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(image), return_tensors="pt")
    bos = processor.tokenizer.bos_token_id
    if bos is not None:
        assert int((inputs["input_ids"][0] == bos).sum()) == 1  # never a doubled BOS
    with torch.no_grad():
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=12)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    assert len(ours) < 12, f"the trained model never ended its answer: {ours}"
    assert theirs == ours + [theirs[-1]] and theirs[-1] in eos, (theirs, ours, eos)
