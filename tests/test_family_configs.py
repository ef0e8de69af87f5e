"""configs/llava_so400m.py's LLMs, the new families' recipes above all (qwen3_8b, gemma2_2b,
gemma3_4b, smollm3_3b, each with its configs/llava_so400m_<llm>.py wrapper):

  * every wrapper builds a valid run for both targets (v5p-64: 32 devices, 8 processes;
    8xh100: 8 devices, 1 process), with its family's chat template and an <image> id in range;
  * each new LLMS entry is what `import-hf` reads from the model's published config.json (with
    the <image> row where the table has no room), and round-trips unchanged through the family's
    transformers config class (decoder_config_to_hf -> transformers -> decoder_config_from_hf);
  * its model section, with only the sizes shrunk to those of a tiny composed import (tiny
    SigLIP with head + a tiny HF LLM of the family, through `vlm-jax import-hf`), passes
    `init=`'s check param for param: the recipe's structure (q/k norms, sandwich norms, biases,
    tied head, vision head) is the import's.

`vlm-jax plan` is not run here: even a shrunk recipe's train step takes ~8 s to compile on 2
cores (the four imports take ~19 s already). The full-size fit checks, with their commands,
are in docs/scaling.md."""
import json
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from vlm_jax.cli import main as cli_main
from vlm_jax.config import load_module
from vlm_jax.convert import hf_llm
from vlm_jax.models import families
from vlm_jax.models.decoder import decoder_config
from vlm_jax.train import run_config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = load_module(os.path.join(REPO, "configs", "llava_so400m.py"))
NEW = {"qwen3_8b": "qwen3", "gemma2_2b": "gemma2", "gemma3_4b": "gemma3", "smollm3_3b": "smollm3"}
TARGETS = {"v5p-64": (32, 8), "8xh100": (8, 1)}

# The published config.json values of each new LLM (4.x spelling, as on the Hub; Gemma 3's are
# the text_config of google/gemma-3-4b-it with the class defaults it relies on written out).
PUBLISHED = {
    "qwen3_8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, hidden_act="silu",
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     rope_scaling=None, attention_bias=False, tie_word_embeddings=False,
                     use_sliding_window=False, sliding_window=None, max_window_layers=36),
    "gemma2_2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304,
                      intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
                      hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                      rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                      query_pre_attn_scalar=256, sliding_window=4096,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_4b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560,
                      intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                      max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      rope_local_base_freq=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0},
                      query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                      attn_logit_softcapping=None, final_logit_softcapping=None),
    "smollm3_3b": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048,
                       intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=4, hidden_act="silu", max_position_embeddings=65536,
                       rms_norm_eps=1e-6, rope_theta=5000000.0, rope_scaling=None,
                       no_rope_layer_interval=4, attention_bias=False, mlp_bias=False,
                       use_sliding_window=False, sliding_window=None, tie_word_embeddings=True),
}
VISION_SIZES = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
LLM_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "mlp_dim")
SWITCHES = ("family", "qkv_bias", "mlp_act", "norm_plus_one", "embed_scale", "tie_embeddings",
            "qk_norm", "post_norms")


def _config(llm, arg=""):
    return os.path.join(REPO, "configs", f"llava_so400m_{llm}.py") + (f":{arg}" if arg else "")


@pytest.mark.parametrize("llm", sorted(BASE.LLMS))
def test_every_recipe_builds_for_both_targets(llm):
    llm_fields, image_token_id, template = BASE.LLMS[llm]
    for target, (devices, processes) in TARGETS.items():
        run = config_lib.build_run_config(
            config_lib.load_config_file(_config(llm, f"target={target}")), devices, processes)
        assert run.model.llm.family == llm_fields["family"]
        assert run.data.template == template == families.get(llm_fields["family"]).template
        assert run.model.image_token_id == image_token_id < run.model.llm.vocab_size
        assert run.data.batch_size * processes == BASE.GLOBAL_BATCH
        assert run.mesh.fsdp == devices and run.model.remat_policy == "full"
    # every field the entry writes is the resolved value (none contradicts its family)
    resolved = run.model.llm
    for field, value in llm_fields.items():
        assert getattr(resolved, field) == value, field


@pytest.mark.parametrize("llm", sorted(NEW))
def test_new_llm_is_the_published_config_and_round_trips_through_transformers(llm):
    fields, image_token_id, _ = BASE.LLMS[llm]
    ours = decoder_config(**fields)
    published = PUBLISHED[llm]
    # import-hf adds <image> at id len(tokenizer) and grows the table only when it has no room
    assert ours.vocab_size == max(published["vocab_size"], image_token_id + 1)
    read = hf_llm.decoder_config_from_hf(dict(published, vocab_size=ours.vocab_size))
    assert read == ours
    hf = hf_llm.decoder_config_to_hf(ours)
    hf_class = transformers.CONFIG_MAPPING[hf["model_type"]]
    hf_config = hf_class(**{k: v for k, v in hf.items() if k != "model_type"})
    assert hf_llm.decoder_config_from_hf(hf_config.to_dict()) == ours
    # the per-layer patterns as transformers holds them
    if llm == "gemma2_2b":
        assert hf_config.layer_types[:2] == ["sliding_attention", "full_attention"]
        assert (hf_config.sliding_window, hf_config.query_pre_attn_scalar) == (4096, 256)
        assert (hf_config.attn_logit_softcapping, hf_config.final_logit_softcapping) == (50.0, 30.0)
    if llm == "gemma3_4b":
        full = [i for i, t in enumerate(hf_config.layer_types) if t == "full_attention"]
        assert full == [5, 11, 17, 23, 29] and hf_config.sliding_window == 1024
        rope = hf_config.rope_parameters
        assert (rope["full_attention"]["rope_type"], rope["full_attention"]["factor"]) == (
            "linear", 8.0)
        assert rope["sliding_attention"]["rope_theta"] == 10000.0
    if llm == "smollm3_3b":
        assert [i for i, flag in enumerate(hf_config.no_rope_layers) if not flag] == list(
            range(3, 36, 4))
    if llm == "qwen3_8b":
        assert hf_config.head_dim == 128 and not hf_config.tie_word_embeddings


@pytest.fixture(scope="module")
def imports(hf_tiny, tmp_path_factory):
    """llm -> a tiny composed import of its family: SigLIP (with its MAP head, as So400m) + a
    tiny HF LLM of the family (tied as the recipe is), through `vlm-jax import-hf`."""
    tmp = tmp_path_factory.mktemp("family_configs")
    torch.manual_seed(0)
    transformers.SiglipVisionModel(hf_tiny.vision(layers=2, vision_use_head=True)).save_pretrained(
        tmp / "siglip")
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
                                         "<end_of_turn>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = {}
    for llm, family in NEW.items():
        tie = BASE.LLMS[llm][0]["tie_embeddings"]
        # (SmolLM3Config's default pad id 128004 is outside the tiny table)
        config = hf_tiny.text(family, tie=tie, pad_token_id=None, bos_token_id=None,
                              eos_token_id=None)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp / llm)
        tok.save(str(tmp / llm / "tokenizer.json"))
        assert cli_main(["import-hf", "--vision", str(tmp / "siglip"), "--text", str(tmp / llm),
                         "--feature-layer", "-2", "--out", str(tmp / f"{llm}_import")]) == 0
        out[llm] = tmp / f"{llm}_import"
    return out


def _shrunk(directory) -> list[str]:
    """Overrides that give the recipe's model section the import's sizes, nothing else."""
    saved = json.loads((directory / "config.json").read_text())["model"]
    return ([f"model.vision.{k}={saved['vision'][k]}" for k in VISION_SIZES]
            + [f"model.llm.{k}={saved['llm'][k]}" for k in LLM_SIZES]
            + [f"model.image_token_id={saved['image_token_id']}"])


@pytest.mark.parametrize("llm", sorted(NEW))
def test_recipe_shrunk_to_a_tiny_import_matches_it_param_for_param(imports, llm):
    directory = imports[llm]
    # load_run_config checks init='s shapes: every param of the recipe is in the import with
    # the same shape and dtype (q/k norms, post norms, biases, lm_head, vision head)
    run = config_lib.load_run_config(_config(llm, f"target=8xh100,init={directory},seq_len=128"),
                                     _shrunk(directory), num_devices=8)
    saved = json.loads((directory / "config.json").read_text())["model"]
    for field in SWITCHES:
        assert getattr(run.model.llm, field) == saved["llm"][field], field
    assert run.model.vision.use_head and saved["vision"]["use_head"]
    assert run.model.vision.feature_layer == saved["vision"]["feature_layer"] == -2
    assert run.tokenizer.path == str(directory)

