"""The composed VLM against transformers' LlavaForConditionalGeneration, through import-hf and the
Python API; plus projectors and the import error paths."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vlm_jax
from vlm_jax.cli import main as cli_main
from vlm_jax.models.projector import Projector, ProjectorConfig, num_output_tokens, pixel_shuffle

IMAGE_TOKEN_ID = 95  # the last id of hf_tiny's 96


def _hf_llava(hf_tiny, tmp_path, family, tie=False, feature_layer=-2):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=hf_tiny.vision(), text_config=hf_tiny.text(family, tie),
                         image_token_index=IMAGE_TOKEN_ID, image_seq_length=16,
                         vision_feature_select_strategy="full", vision_feature_layer=feature_layer,
                         projector_hidden_act="gelu", tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random non-trivial norms so the 1+w / w conventions are exercised
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf_dir = tmp_path / f"hf_{family}"
    model.save_pretrained(hf_dir)
    return model, str(hf_dir)


def _inputs(rng, batch=2, text=12, images_per_row=(1, 2), tokens_per_image=16, size=32):
    """Rows with images in the middle of the text (and two images in the second row)."""
    rows = []
    for n in images_per_row:
        ids = list(rng.integers(0, IMAGE_TOKEN_ID, size=3))
        for _ in range(n):
            ids += [IMAGE_TOKEN_ID] * tokens_per_image + list(rng.integers(0, IMAGE_TOKEN_ID, size=2))
        rows.append(ids)
    width = max(len(r) for r in rows) + text
    input_ids = np.zeros((batch, width), np.int64)
    attention_mask = np.zeros((batch, width), np.int64)
    for b, r in enumerate(rows):
        r = r + list(rng.integers(0, IMAGE_TOKEN_ID, size=width - len(r) - b))  # row 1 right-padded
        input_ids[b, :len(r)] = r
        attention_mask[b, :len(r)] = 1
    pixel_values = rng.standard_normal((sum(images_per_row), 3, size, size)).astype(np.float32)
    return input_ids, attention_mask, pixel_values


@pytest.mark.parity
@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("gemma", True)])
def test_llava_parity_through_import_and_api(hf_tiny, tmp_path, family, tie):
    hf_model, hf_dir = _hf_llava(hf_tiny, tmp_path, family, tie)
    out = tmp_path / "ckpt"
    assert cli_main(["import-hf", "--hf-dir", hf_dir, "--out", str(out)]) == 0
    model = vlm_jax.load(str(out))
    assert model.config.llm.family == family and model.config.tokens_per_image == 16

    input_ids, attention_mask, pixel_values = _inputs(np.random.default_rng(1))
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(input_ids), pixel_values=torch.tensor(pixel_values),
                        attention_mask=torch.tensor(attention_mask)).logits.numpy()
    got = model.logits(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    real = attention_mask.astype(bool)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parity
def test_compose_siglip_and_llm_adds_image_token(hf_tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vision_dir, text_dir = tmp_path / "siglip", tmp_path / "llm"
    transformers.SiglipVisionModel(hf_tiny.vision()).save_pretrained(vision_dir)
    llm_config = hf_tiny.text("llama", tie=False)
    llm_config.vocab_size = 8  # the tokenizer below has exactly 8 tokens: <image> must grow it
    transformers.LlamaForCausalLM(llm_config).save_pretrained(text_dir)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "red", "circle", "is", "here"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(text_dir / "tokenizer.json"))

    out = tmp_path / "composed"
    assert cli_main(["import-hf", "--vision", str(vision_dir), "--text", str(text_dir),
                     "--projector", "pixel_shuffle", "--out", str(out)]) == 0
    model = vlm_jax.load(str(out))
    assert model.config.image_token_id == 8 and model.config.llm.vocab_size == 9
    assert model.tokenizer.token_to_id("<image>") == 8
    assert model.config.tokens_per_image == 4  # 16 patches, pixel shuffle 2x2
    # the LLM weights came through unchanged; the new embedding row starts near the mean of the others
    llm_sd = transformers.LlamaForCausalLM.from_pretrained(text_dir).state_dict()
    emb = np.asarray(model.params["llm"]["embed"]["embedding"])
    np.testing.assert_array_equal(emb[:8], llm_sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_allclose(emb[8], emb[:8].mean(0), atol=3e-4)  # mean + 1e-3 std noise
    ids = np.array([[3, 4] + [8] * 4 + [5, 6]])
    logits = model.logits(input_ids=ids, pixel_values=np.zeros((1, 3, 32, 32), np.float32))
    assert logits.shape == (1, 8, 9) and np.isfinite(logits).all()


def test_placeholder_mismatch_is_a_clear_error(hf_tiny, tmp_path):
    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama")
    out = tmp_path / "ckpt"
    assert cli_main(["import-hf", "--hf-dir", hf_dir, "--out", str(out)]) == 0
    model = vlm_jax.load(str(out))
    input_ids, _, pixel_values = _inputs(np.random.default_rng(0))
    with pytest.raises(ValueError, match="image"):
        model.logits(input_ids=input_ids, pixel_values=pixel_values[:2])
    with pytest.raises(ValueError, match="image tokens"):
        model.logits(input_ids=input_ids)


def test_import_refuses_unsupported_and_mismatched(hf_tiny, tmp_path, capsys):
    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "llama")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["text_config"]["model_type"] = "mixtral"
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    assert cli_main(["import-hf", "--hf-dir", hf_dir, "--out", str(tmp_path / "x")]) == 2
    assert "mixtral" in capsys.readouterr().err

    _, hf_dir = _hf_llava(hf_tiny, tmp_path, "qwen2")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["text_config"]["intermediate_size"] = 100  # weights say 96
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    assert cli_main(["import-hf", "--hf-dir", hf_dir, "--out", str(tmp_path / "y")]) == 2
    assert "mlp" in capsys.readouterr().err


def test_pixel_shuffle_matches_numpy_blocks():
    side, s, d = 4, 2, 3
    tokens = np.random.default_rng(0).standard_normal((1, side * side, d)).astype(np.float32)
    got = np.asarray(pixel_shuffle(tokens, s))
    grid = tokens[0].reshape(side, side, d)
    for out_index in range((side // s) ** 2):
        by, bx = divmod(out_index, side // s)
        block = grid[by * s:(by + 1) * s, bx * s:(bx + 1) * s].reshape(-1)
        np.testing.assert_array_equal(got[0, out_index], block)
    assert num_output_tokens(ProjectorConfig(type="pixel_shuffle", pixel_shuffle_factor=2), 16) == 4
    assert num_output_tokens(ProjectorConfig(type="resampler", num_queries=7), 16) == 7
    with pytest.raises(ValueError, match="pixel_shuffle_factor"):
        num_output_tokens(ProjectorConfig(type="pixel_shuffle", pixel_shuffle_factor=3), 16)
    with pytest.raises(ValueError, match="projector.type"):
        ProjectorConfig(type="qformer")


def test_projector_options_norm_pos_embed_hidden_dim():
    """input_norm, pos_embed and hidden_dim create their parameters; pos_embed gives identical
    vision tokens different outputs by grid place (without it they stay identical)."""
    import flax.linen as nn
    import jax
    tokens = np.tile(np.random.default_rng(0).standard_normal((1, 1, 8)), (2, 16, 1))
    def run(**options):
        module = Projector(ProjectorConfig(type="pixel_shuffle", **options), out_dim=6)
        params = nn.unbox(jax.jit(module.init)(jax.random.key(0), tokens)["params"])
        out = jax.jit(module.apply)({"params": params}, tokens)
        return jax.tree.map(np.shape, params), np.asarray(out)
    shapes, out = run()
    assert out.shape == (2, 4, 6) and np.allclose(out, out[:, :1])
    shapes, out = run(input_norm=True, pos_embed=True, hidden_dim=24)
    assert shapes["input_norm"]["scale"] == (8,) and shapes["pos_embed"] == (4, 32)
    assert shapes["mlp"]["linear_1"]["kernel"] == (32, 24)
    assert shapes["mlp"]["linear_2"]["kernel"] == (24, 6)
    assert np.abs(out[:, 1:] - out[:, :1]).min() > 1e-3 and np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match="pos_embed"):
        ProjectorConfig(type="resampler", pos_embed=True)
