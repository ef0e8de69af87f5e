"""Model-FLOP counting: equal to the PyTorch peer's formula on its bench_s model (weights counted
from the HF modules), per-phase factors, XLA's own count of a forward, peaks and MFU arithmetic."""
import jax
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from vlm_jax.convert.hf_llava import config_from_hf
from vlm_jax.models.decoder import decoder_config
from vlm_jax.models.vlm import VLM, VLMConfig, dummy_inputs, init_params
from vlm_jax.models.siglip import TextTowerConfig, VisionConfig
from vlm_jax.train import flops
from vlm_jax.train.lora import LoraConfig
from vlm_jax.train.phases import PhaseConfig

# bench_s (../shared/bench/bench_s.json beside the repo): the model, batch and phase of the peer benchmark.
BATCH, IMAGE_TOKENS, TEXT_LEN = 8, 196, 128


def bench_s_hf_config() -> LlavaConfig:
    vision = SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                num_attention_heads=6, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                vision_use_head=False)
    text = LlamaConfig(vocab_size=32000, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                       image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu",
                       vision_feature_select_strategy="full", vision_feature_layer=-2,
                       tie_word_embeddings=True)


def matmul_weights(module: nn.Module) -> int:
    """What the peer counts: nn.Linear / nn.Conv2d weights."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.fixture(scope="module")
def bench_s():
    hf_config = bench_s_hf_config()
    with torch.device("meta"):  # shapes only: nothing is allocated
        hf_model = LlavaForConditionalGeneration(hf_config)
    return hf_config, hf_model, config_from_hf(hf_config.to_dict())


def test_instruct_equals_peer_formula(bench_s):
    hf_config, hf_model, config = bench_s
    inner = hf_model.model
    n_vis = matmul_weights(inner.vision_tower)
    n_proj = matmul_weights(inner.multi_modal_projector)
    n_dec = matmul_weights(inner.language_model)
    v, t = hf_config.vision_config, hf_config.text_config
    seq = IMAGE_TOKENS + TEXT_LEN
    peer = {
        "vision": BATCH * (2 * n_vis * IMAGE_TOKENS
                           + 4 * v.num_hidden_layers * IMAGE_TOKENS ** 2 * v.hidden_size),
        "projector": 6 * BATCH * n_proj * IMAGE_TOKENS,
        "decoder+head": 6 * BATCH * (n_dec + t.vocab_size * t.hidden_size) * seq,
        "attention": 12 * BATCH * t.num_hidden_layers * seq ** 2 * t.num_attention_heads * t.head_dim,
    }
    ours = flops.train_step_flops(config, "instruct", BATCH, seq)
    assert ours.vision == peer["vision"]
    assert ours.projector == peer["projector"]
    assert ours.decoder + ours.lm_head == peer["decoder+head"]
    assert ours.decoder_attention == peer["attention"]
    assert ours.total == sum(peer.values())
    # The figure the peer's docstring quotes: ~160 GFLOP/s at 5.1 s/step.
    assert 150e9 < ours.total / 5.1 < 170e9


def test_phase_factors(bench_s):
    _, _, config = bench_s
    seq = IMAGE_TOKENS + TEXT_LEN
    fwd_vision = BATCH * flops.vision_forward_flops(config.vision)
    fwd_proj = BATCH * flops.projector_forward_flops(config)
    instruct = flops.train_step_flops(config, "instruct", BATCH, seq)
    per_token_dec = instruct.decoder / (6 * BATCH * seq)
    # align: projector trains (6N), the frozen LLM still passes the gradient back (4N, attention x3).
    align = flops.train_step_flops(config, "align", BATCH, seq)
    assert align.vision == fwd_vision and align.projector == 3 * fwd_proj
    assert align.decoder == 4 * BATCH * seq * per_token_dec
    assert align.lm_head * 3 == instruct.lm_head * 2
    assert align.decoder_attention == instruct.decoder_attention
    # instruct with the encoder training at a low lr: the vision tower costs 6N too.
    unfrozen = flops.train_step_flops(config, PhaseConfig("instruct", vision_lr_mult=0.1), BATCH, seq)
    assert unfrozen.vision == 3 * fwd_vision
    # LoRA: the base LLM is frozen but backpropagated through.
    lora = flops.train_step_flops(config, PhaseConfig("instruct", lora=LoraConfig()), BATCH, seq)
    assert lora.decoder == align.decoder and lora.projector == instruct.projector
    # What an implementation executes: logits only at loss positions, vision up to feature_layer.
    head_positions = flops.train_step_flops(config, "instruct", BATCH, seq,
                                            lm_head_positions=TEXT_LEN)
    assert head_positions.lm_head * seq == instruct.lm_head * TEXT_LEN
    fewer_layers = flops.train_step_flops(config, "instruct", BATCH, seq,
                                          vision_layers=config.vision.feature_depth)
    assert fewer_layers.vision < instruct.vision


def test_contrastive_by_hand():
    vision = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
    text = TextTowerConfig(vocab_size=100, width=48, depth=3, num_heads=4, mlp_dim=96, max_len=8,
                           projection_dim=32)
    config = VLMConfig(vision=vision, text_tower=text)
    got = flops.train_step_flops(config, "contrastive", 4)
    n, d, f = 16, 32, 64
    layer = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    head = 2 * (2 * n * d * d + 2 * d * d + 2 * d * f) + 4 * n * d
    vision_fwd = 2 * n * 8 * 8 * 3 * d + 2 * layer + head
    tn, td, tf = 8, 48, 96
    text_fwd = 3 * (2 * tn * (4 * td * td + 2 * td * tf) + 4 * tn * tn * td) + 2 * td * 32
    assert got.vision == 3 * 4 * vision_fwd
    assert got.text_tower == 3 * 4 * text_fwd
    assert got.contrastive_loss == 3 * 2 * 4 * 4 * 32
    assert got.decoder == got.lm_head == 0


def test_lm_forward_matches_xla_cost_analysis():
    """Independent count: XLA's cost analysis of the compiled forward (matmuls dominate when the
    widths are large next to the elementwise work), against our forward = train / 3. One layer:
    XLA counts a scanned (while-loop) body once, whatever the trip count."""
    llm = decoder_config("llama", vocab_size=512, hidden_size=256, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=64, mlp_dim=512)
    config = VLMConfig(llm=llm)
    batch, seq = 2, 64
    params = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
    inputs = dummy_inputs(config, batch, seq)
    forward = jax.jit(lambda p, i: VLM(config).apply({"params": p}, i["input_ids"], None,
                                                    i["positions"], i["mask_ar"]))
    cost = forward.lower(params, inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops.train_step_flops(config, "lm", batch, seq).total / 3
    assert abs(cost["flops"] - ours) / ours < 0.1, (cost["flops"], ours)


def test_peaks_and_mfu():
    assert flops.known_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.known_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.known_peak_flops("TPU v5 lite", "float32") == 197e12
    assert flops.known_peak_flops("TPU v5p", "bfloat16") == 459e12
    assert flops.known_peak_flops("Imaginary accelerator") is None
    with pytest.raises(ValueError, match="dtype"):
        flops.known_peak_flops("TPU v4", "int8")
    assert flops.peak_flops_per_device(configured=290e9) == 290e9
    assert flops.mfu(100e9, 2.0, 100e9, num_devices=2) == pytest.approx(0.25)
    assert flops.mfu(1.0, 1.0, None) is None
    with pytest.raises(ValueError, match="step_seconds"):
        flops.mfu(1.0, 0.0, 1.0)
    # On CPU the peak is measured and shared among the process's CPU devices (8 in tests).
    cpu = jax.devices("cpu")[0]
    measured = flops.measure_matmul_flops(size=256, repeats=2, device=cpu)
    assert 1e8 < measured < 1e13
    assert flops.peak_flops_per_device(cpu, measure_cpu=False) is None
    per_device = flops.peak_flops_per_device(cpu)
    whole_process = flops.measure_matmul_flops(device=cpu)
    num_cpu = len(jax.local_devices(backend="cpu"))
    assert whole_process / num_cpu / 4 < per_device < whole_process / num_cpu * 4


def test_a_projector_without_a_formula_gives_unknown_flops_not_an_error(monkeypatch):
    from vlm_jax.models.projector import ProjectorConfig
    vision = VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                          use_head=False)
    llm = decoder_config("llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, mlp_dim=64)
    config = VLMConfig(vision=vision, projector=ProjectorConfig(type="linear"), llm=llm,
                       image_token_id=4)
    assert flops.missing_flop_formula(config, "instruct") is None
    known = flops.train_step_flops(config, "instruct", 4, 32)
    assert known.projector > 0
    # A projector type nobody has written a formula for yet (every shipped type has one).
    monkeypatch.delitem(flops.PROJECTOR_FLOP_FORMULAS, "linear")
    assert flops.projector_forward_flops(config) is None
    assert flops.missing_flop_formula(config, PhaseConfig("align")) == "model.projector.type='linear'"
    for phase in ("align", "instruct"):
        assert flops.train_step_flops(config, phase, 4, 32) is None
    assert flops.mfu(None, 1.0, 1e12, num_devices=8) is None
    # The LLM alone (phase lm) has nothing unknown.
    lm = VLMConfig(llm=llm)
    assert flops.missing_flop_formula(lm, "lm") is None
    assert flops.train_step_flops(lm, "lm", 4, 32).total > 0


def test_sliding_layers_count_their_window_of_keys():
    """Why / Gemma 2 / 3 attend over a window on their sliding layers: the model FLOPs of those
    layers' attention cover `sliding_window` keys per query, the full layers the whole row."""
    def attention(family, **fields):
        llm = decoder_config(family, vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=48, **fields)
        return flops.train_step_flops(VLMConfig(llm=llm), "lm", 2, seq_len=100).decoder_attention
    full = attention("gemma2", sliding_window=0)
    assert full == attention("gemma")
    assert attention("gemma2", sliding_window=30) == full * (2 * 30 + 2 * 100) // (4 * 100)
    assert attention("gemma2", sliding_window=500) == full
