"""Native PaliGemma (`PaliGemmaForConditionalGeneration`, Gemma and Gemma 2 text) in both
directions: `import-hf` computes what transformers computes, prefix-LM attention from
token_type_ids included; `export-hf --format paligemma` (and auto) writes it back bit-exactly and
checks itself; what PaliGemma cannot hold is refused naming the field."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

import vlm_jax
from vlm_jax.cli import main as cli_main
from vlm_jax.convert import exporter, hf_paligemma
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.errors import ConversionError
from vlm_jax.models.vlm import VLM

pytestmark = pytest.mark.parity

VOCAB = 96
IMAGE_TOKEN_ID = 95
TOKENS_PER_IMAGE = 16  # hf_tiny's 32 px SigLIP in 8 px patches
FAMILIES = ("gemma", "gemma2")


def _save_tokenizer(directory):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"]
                                        + [f"w{i}" for i in range(VOCAB - 5)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # as in Gemma's tokenizer, BOS / EOS / PAD are special tokens (one id wherever they appear)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<pad>", "<eos>", "<bos>", "<image>")])
    tok.save(os.path.join(directory, "tokenizer.json"))


class Imported:
    def __init__(self, hf_model, hf_dir, ckpt):
        self.hf_model, self.hf_dir, self.ckpt = hf_model, hf_dir, ckpt


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, hf_tiny, tmp_path_factory):
    """A tiny random HF PaliGemma of each text family, every tensor perturbed (so no bias, norm
    or scale sits at a value that would hide a convention), saved and imported by the CLI."""
    return _import_tiny(hf_tiny, request.param, tmp_path_factory.mktemp(f"paligemma_{request.param}"))


def _import_tiny(hf_tiny, family, tmp):
    torch.manual_seed(0)
    config = PaliGemmaConfig(vision_config=hf_tiny.vision(layers=2),
                             text_config=hf_tiny.text(family, tie=True),
                             image_token_index=IMAGE_TOKEN_ID, projection_dim=48, hidden_size=48,
                             vocab_size=VOCAB)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_attn_implementation("eager")
    hf_dir = tmp / "hf"
    model.save_pretrained(hf_dir)
    _save_tokenizer(hf_dir)
    ckpt = tmp / "ckpt"
    assert cli_main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(ckpt)]) == 0
    return Imported(model, str(hf_dir), str(ckpt))


def _inputs(rng, prefix_text=(3, 6), suffix=(5, 2)):
    """Two rows: image, `<bos>`-like text prompt (token_type 0), then a suffix (token_type 1);
    both prefixes (19 and 22 tokens) are longer than Gemma 2's sliding window of 8."""
    ids, types = [], []
    for p, s in zip(prefix_text, suffix):
        text = list(rng.integers(0, IMAGE_TOKEN_ID, p + s))
        ids.append([IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + text)
        types.append([0] * (TOKENS_PER_IMAGE + p) + [1] * s)
    width = max(len(r) for r in ids)
    assert all(len(r) == width for r in ids)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    return np.array(ids), np.array(types), pixels


def _ours(model, input_ids, pixels, mask_ar, first_position):
    t = input_ids.shape[1]
    positions = jnp.broadcast_to(jnp.arange(first_position, first_position + t, dtype=jnp.int32),
                                 input_ids.shape)
    out = jax.jit(lambda p: VLM(model.config).apply(
        {"params": p}, jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None], positions,
        jnp.asarray(mask_ar, jnp.int32)))(model.params)
    return np.asarray(out)


def test_import_reads_paligemma_as_it_computes(imported):
    """The config the import derives: last-layer post-LN features, one Linear with bias, the
    image token, and Gemma 2's final soft-cap kept (PaliGemma's lm_head applies it)."""
    config = vlm_jax.load(imported.ckpt).config
    assert config.vision.feature_post_norm and config.vision.feature_layer == -1
    assert (config.projector.type, config.projector.bias) == ("linear", True)
    assert config.image_token_id == IMAGE_TOKEN_ID and config.tokens_per_image == TOKENS_PER_IMAGE
    if config.llm.family == "gemma2":
        assert config.llm.final_logit_softcap == 3.0 and config.llm.sliding_window == 8


def test_prefix_lm_logits_match_transformers(imported):
    """Why: PaliGemma attends bidirectionally over image + prompt (token_type_ids 0) and causally
    over the suffix, and on Gemma 2's sliding layers the window never cuts that prefix; our
    mask_ar = token_type_ids must give the same logits (eager attention, f32, HF's 1-indexed
    positions; and with our 0-indexed ones, which RoPE makes equal up to rounding)."""
    model = vlm_jax.load(imported.ckpt)
    input_ids, token_types, pixels = _inputs(np.random.default_rng(1))
    with torch.no_grad():
        want = imported.hf_model(input_ids=torch.tensor(input_ids),
                                 pixel_values=torch.tensor(pixels),
                                 token_type_ids=torch.tensor(token_types)).logits.numpy()
    mask_ar = hf_paligemma.mask_ar_from_token_type_ids(token_types)
    got = _ours(model, input_ids, pixels, mask_ar, first_position=1)
    diff = float(np.abs(got - want).max())
    print(f"{model.config.llm.family} prefix-LM max |diff| {diff:.3g}")
    assert diff <= 1e-4
    assert float(np.abs(_ours(model, input_ids, pixels, mask_ar, 0) - want).max()) <= 1e-4
    # the prefix matters: a causal mask gives other logits on the prefix
    causal = _ours(model, input_ids, pixels, np.ones_like(mask_ar), 1)
    assert float(np.abs(causal - want).max()) > 1e-2


def test_the_import_records_prefix_lm_and_score_repeats_it(imported):
    """Why / a prefix-LM model decoded causally answers differently: the import records
    `prefix_lm` in the model directory, `vlm_jax.load` carries it, and `score` (as `vlm-jax
    score` / `generate` pass it) gives the suffix the log-probs transformers gives with
    token_type_ids marking the prompt."""
    from vlm_jax import model_dir
    from vlm_jax.inference.generate import score
    assert model_dir.load_data_settings(imported.ckpt)["prefix_lm"]
    model = vlm_jax.load(imported.ckpt)
    assert model.prefix_lm
    input_ids, token_types, pixels = _inputs(np.random.default_rng(3))
    row, cut = input_ids[0], int((token_types[0] == 0).sum())
    with torch.no_grad():
        logits = imported.hf_model(input_ids=torch.tensor(row[None]),
                                   pixel_values=torch.tensor(pixels[:1]),
                                   token_type_ids=torch.tensor(token_types[:1])).logits
    want = torch.log_softmax(logits[0, cut - 1:-1], -1).gather(
        -1, torch.tensor(row[cut:, None])).numpy()[:, 0]
    images = pixels[:1].transpose(0, 2, 3, 1)[:, None]
    got = score(model.config, model.params, row[:cut].tolist(), row[cut:].tolist(), images,
                prefix_lm=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    causal = score(model.config, model.params, row[:cut].tolist(), row[cut:].tolist(), images)
    assert float(np.abs(causal - want).max()) > 1e-3


def test_without_token_type_ids_it_is_causal(imported):
    """Why: transformers' PaliGemma without token_type_ids is a causal LM (eager); our API's
    `logits` (causal) must match it, so the exporter's probes and users' causal calls agree."""
    model = vlm_jax.load(imported.ckpt)
    input_ids, _, pixels = _inputs(np.random.default_rng(2))
    with torch.no_grad():
        want = imported.hf_model(input_ids=torch.tensor(input_ids),
                                 pixel_values=torch.tensor(pixels)).logits.numpy()
    got = model.logits(input_ids=input_ids, pixel_values=pixels)
    assert float(np.abs(got - want).max()) <= 1e-4


def test_export_round_trip_is_bit_exact_and_checks_itself(imported, tmp_path, capsys):
    """Why: HF -> import -> export -> HF must reproduce every tensor bit for bit under the names
    transformers writes, `--format auto` must pick PaliGemma for a PaliGemma import, and the
    self-check (PaliGemma logits with a bidirectional prefix) must pass."""
    out = tmp_path / "exported"
    assert cli_main(["export-hf", "--checkpoint", imported.ckpt, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "PaliGemmaForConditionalGeneration" in said
    # its processor gave our prompt ids and pixels, and generate our greedy answer (prefix-LM)
    assert "the same greedy answer" in said, said
    want = load_file(os.path.join(imported.hf_dir, "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["PaliGemmaForConditionalGeneration"]
    assert config["image_token_index"] == IMAGE_TOKEN_ID
    reloaded, info = PaliGemmaForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    input_ids, token_types, pixels = _inputs(np.random.default_rng(3))
    kw = dict(input_ids=torch.tensor(input_ids), pixel_values=torch.tensor(pixels),
              token_type_ids=torch.tensor(token_types))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded.eval()(**kw).logits.numpy(),
                                      imported.hf_model(**kw).logits.numpy())
    # the explicit format writes the same thing
    assert cli_main(["export-hf", "--checkpoint", imported.ckpt, "--out", str(tmp_path / "e2"),
                     "--format", "paligemma"]) == 0


def test_paligemma_refuses_what_it_cannot_hold_naming_the_field(imported, tiny_vlm_config):
    """Why: `--format paligemma` on another composition must say which field prevents it, before
    writing anything; LLaVA refuses a post-LN vision read it cannot express."""
    llava_shaped = tiny_vlm_config(family="gemma")
    with pytest.raises(ConversionError, match="model.projector.type='mlp2x_gelu'"):
        exporter.resolve_format(llava_shaped, "paligemma")
    assert exporter.resolve_format(llava_shaped, "auto") == "llava"
    config = vlm_jax.load(imported.ckpt).config
    assert exporter.resolve_format(config, "auto") == "paligemma"
    import dataclasses
    no_norm = dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                     feature_post_norm=False))
    with pytest.raises(ConversionError, match="feature_post_norm=False"):
        exporter.resolve_format(no_norm, "paligemma")
    assert exporter.resolve_format(no_norm, "auto") == "custom"
    post_norm_llava = dataclasses.replace(llava_shaped, vision=dataclasses.replace(
        llava_shaped.vision, feature_post_norm=True))
    with pytest.raises(ConversionError, match="feature_post_norm=True"):
        exporter.resolve_format(post_norm_llava, "llava")


def test_the_exported_processor_writes_what_vlm_jax_generate_reads(imported, tmp_path):
    """Why: a transformers user drives the export through AutoProcessor: it must be a
    PaliGemmaProcessor whose ids (images, BOS, prompt, newline; token_type_ids all prefix) are
    our "paligemma" template's prompt, and whose suffix is our learned answer + EOS."""
    from transformers import AutoProcessor
    from vlm_jax.data.templates import get_template
    from vlm_jax.inference.prompts import prompt_ids
    from PIL import Image

    out = tmp_path / "exported"
    assert cli_main(["export-hf", "--checkpoint", imported.ckpt, "--out", str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "PaliGemmaProcessor"
    assert processor.image_seq_length == TOKENS_PER_IMAGE
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    tokenizer = vlm_jax.load(imported.ckpt).tokenizer
    want = prompt_ids(tokenizer, "w1 w2", "paligemma", TOKENS_PER_IMAGE).tolist()
    for text in ("w1 w2", "<image>w1 w2"):  # without <image> the processor puts it first
        batch = processor(images=image, text=text, return_tensors="np")
        assert batch["input_ids"][0].tolist() == want
        assert not batch["token_type_ids"].any()
    assert want[TOKENS_PER_IMAGE] == tokenizer.bos_id  # (this word-level tokenizer drops "\n")
    batch = processor(images=image, text="w1 w2", suffix="w3", return_tensors="np")
    pieces = get_template("paligemma").render(
        [{"role": "user", "content": "<image>\nw1 w2"}, {"role": "assistant", "content": "w3"}],
        tokenizer.bos_token, tokenizer.eos_token)
    assert batch["input_ids"][0].tolist()[len(want):] == tokenizer.encode(pieces[1][0])
    assert batch["token_type_ids"][0].tolist() == [0] * len(want) + [1] * 2


def test_a_paligemma_shape_with_another_template_exports_tokenizer_only_and_says_why():
    """Why: PaliGemmaProcessor writes one layout; a model trained on another template (or with
    padded images) must not get a processor that feeds it other inputs."""
    from vlm_jax.convert.hf_processor import ChatSettings, processor_blocker
    assert processor_blocker("paligemma", ChatSettings("paligemma")) is None
    assert "data.template='gemma'" in processor_blocker("paligemma", ChatSettings("gemma"))
    assert "data.pad_to_square=True" in processor_blocker(
        "paligemma", ChatSettings("paligemma", pad_to_square=True))
    assert "import it again" in processor_blocker("paligemma", ChatSettings(None))
    assert processor_blocker("llava", ChatSettings("gemma", pad_to_square=True)) is None


COLOURS = {"w10": (220, 30, 30), "w11": (30, 200, 30), "w12": (30, 30, 220)}  # answer word -> rgb


def _colour_data(root, n):
    """LLaVA JSON of n single-question rows "w1 w2" -> the colour word of a non-square image,
    plus one multi-turn row (PaliGemma reads one question: skipped and counted)."""
    from PIL import Image
    (root / "images").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        word = sorted(COLOURS)[i % 3]
        pixels = np.full((int(rng.integers(24, 48)), int(rng.integers(24, 48)), 3),
                         COLOURS[word], np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nw1 w2"}, {"from": "gpt", "value": word}]})
    rows.append({"id": "multi", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nw1 w2"}, {"from": "gpt", "value": "w10"},
        {"from": "human", "value": "w3"}, {"from": "gpt", "value": "w4"}]})
    (root / "train.json").write_text(json.dumps(rows))


@pytest.mark.slow
def test_fine_tuning_paligemma2_end_to_end_and_it_answers_the_same_in_transformers(
        hf_tiny, tmp_path, capsys):
    """Why: a researcher starts from PaliGemma 2, fine-tunes it with `vlm-jax train`
    (configs/paligemma_transfer.py: the paligemma template, prefix-LM attention) and hands it
    back. The tiny model must learn the task, keep reading PaliGemma's prompts, export as
    PaliGemma with a processor, and answer in transformers (AutoProcessor + generate) exactly
    as `vlm-jax generate` does."""
    import transformers
    from vlm_jax import model_dir
    base = _import_tiny(hf_tiny, "gemma2", tmp_path / "pg2")
    _colour_data(tmp_path, 24)
    arg = (f"model={base.ckpt},data={tmp_path / 'train.json'},images={tmp_path / 'images'},"
           f"epochs=25,batch=8,seq_len=32,lr=3e-3")
    assert cli_main(["train", "--config", f"configs/paligemma_transfer.py:{arg}",
                     "--workdir", str(tmp_path / "ft"), "--config.mesh.data=-1",
                     "--config.mesh.fsdp=1", "--config.log.progress_bar=False",
                     "--config.log.tensorboard=False", "--config.checkpoint.async_save=False",
                     "--config.log.every_steps=1"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.2 * losses[0], losses
    assert rows[-1]["examples_seen"] == 25 * 24
    assert rows[-1]["data/skipped/conversation_malformed"] == 1  # the multi-turn row, counted
    assert model_dir.load_data_settings(str(tmp_path / "ft" / "model")) == {
        "template": "paligemma", "pad_to_square": False, "prefix_lm": True,
        "tiling": TilingConfig()}

    capsys.readouterr()
    assert cli_main(["export-hf", "--checkpoint", str(tmp_path / "ft"),
                     "--out", str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out
    assert "PaliGemmaForConditionalGeneration" in said and "the same greedy answer" in said, said

    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    hf_model = PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32).eval()
    from PIL import Image
    right = 0
    for i in range(6):  # the first images, one prompt each, through both stacks
        image = tmp_path / "images" / f"{i}.png"
        assert cli_main(["generate", "--checkpoint", str(tmp_path / "ft"), "--image", str(image),
                         "--prompt", "w1 w2", "--max-new-tokens", "4"]) == 0
        ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
        inputs = processor(images=Image.open(image), text="w1 w2", return_tensors="pt")
        with torch.no_grad():
            out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=4)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = hf_model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        assert theirs[:len(ours)] == ours and (len(ours) == 4 or theirs[len(ours)] in eos), (
            theirs, ours)
        right += processor.tokenizer.decode(ours).strip() == sorted(COLOURS)[i % 3]
    assert right >= 5, f"the fine-tuned model answers {right}/6 colours right"
