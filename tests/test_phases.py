"""Phases on a tiny VLM: trainable params move, frozen ones stay bit-identical, the optimizer holds
state for trainable leaves only, lr multipliers scale the first Adam step, and LoRA trains adapters
on a frozen LLM whose merged kernels equal W + alpha/r * A @ B (numpy)."""
import functools
import re

import jax
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.models.decoder import decoder_config
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.siglip import TextTowerConfig, VisionConfig
from vlm_jax.models.vlm import VLMConfig, init_params
from vlm_jax.train import param_groups, phases
from vlm_jax.train.lora import LoraConfig
from vlm_jax.train.optimizer import OptimizerConfig
from vlm_jax.train.step import TrainStepConfig, create_train_state, make_train_step, plan_training

LR = 1e-2


def _config(text_tower=True):
    return VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32,
                            use_head=True),
        text_tower=TextTowerConfig(vocab_size=32, width=16, depth=1, num_heads=2, mlp_dim=32,
                                   max_len=8, projection_dim=16) if text_tower else None,
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=decoder_config("llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=8, mlp_dim=32),
        image_token_id=63)


@functools.lru_cache(maxsize=None)
def _base_params():
    """One random init shared by every phase, kept on the host (steps donate device buffers)."""
    params = jax.jit(lambda rng: init_params(_config(), rng))(jax.random.key(0))
    return jax.tree.map(np.asarray, params)


def _batch(config, with_images=True, batch_size=4):
    rng = np.random.default_rng(0)
    n = config.tokens_per_image if with_images else 0
    t = n + 6
    ids = rng.integers(0, 63, (batch_size, t)).astype(np.int32)
    ids[:, 1:1 + n] = config.image_token_id
    batch = dict(input_ids=ids, target_ids=np.roll(ids, -1, 1),
                 loss_mask=np.broadcast_to(np.arange(t) > n, (batch_size, t)).astype(np.float32),
                 positions=np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)).copy(),
                 mask_ar=np.ones((batch_size, t), np.int32),
                 text_ids=rng.integers(0, 32, (batch_size, 8)).astype(np.int32))
    if with_images:
        batch["images"] = rng.integers(0, 256, (batch_size, 1, 16, 16, 3), dtype=np.uint8)
    return batch


def _train(phase, steps):
    """(plan, initial state on host, final state on host, metrics per step) on one device."""
    config = _config()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=LR, schedule="constant", total_steps=10,
                                grad_clip_norm=None)
    plan = plan_training(config, TrainStepConfig(phase=phase, optimizer=optimizer), mesh)
    state = create_train_state(plan, jax.random.key(1), params=_base_params())
    initial = jax.tree.map(np.asarray, state)
    train_step = make_train_step(plan)
    batch = sharding.global_batch(_batch(config, with_images=phase.name != "lm"), mesh)
    metrics = []
    for _ in range(steps):
        state, m = train_step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return plan, initial, jax.tree.map(np.asarray, state), metrics


def _flat(tree):
    return param_groups.flatten(tree)


# parts expected to train per phase, and trainable params the step never reads (no gradient):
# the VLM path reads vision features before post_layernorm and never the MAP head.
CASES = {
    "contrastive": (phases.PhaseConfig("contrastive"), {"vision_tower", "text_tower", "contrastive"}, None),
    "lm": (phases.PhaseConfig("lm"), {"llm"}, None),
    "align": (phases.PhaseConfig("align"), {"projector"}, None),
    "instruct": (phases.PhaseConfig("instruct"), {"projector", "llm"}, None),
    "instruct_vision": (phases.PhaseConfig("instruct", vision_lr_mult=0.1),
                        {"projector", "llm", "vision_tower"}, r"vision_tower/(head|post_layernorm)/.*"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_phase_trains_its_params_only(case):
    phase, parts, unread = CASES[case]
    plan, initial, final, metrics = _train(phase, steps=3)
    assert set(final.trainable) == parts
    assert all(m["is_finite"] == 1.0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    # frozen: bit-identical to the initial params, and everything not in `parts` is frozen
    base = _flat(_base_params())
    for path, value in _flat(final.frozen).items():
        np.testing.assert_array_equal(value, base[path], err_msg=path)
    assert {p.split("/")[0] for p in _flat(final.frozen)} == set(_base_params()) - parts

    # trainable: every param the step reads has moved
    for path, value in _flat(final.trainable).items():
        if unread is None or not re.fullmatch(unread, path):
            assert not np.array_equal(value, base[path]), f"{path} did not change"

    # optimizer state: Adam's mu and nu for trainable leaves only (plus scalar step counters)
    trainable_shapes = sorted(v.shape for v in _flat(final.trainable).values())
    state_shapes = sorted(x.shape for x in jax.tree.leaves(final.opt_state) if x.ndim > 0)
    assert state_shapes == sorted(trainable_shapes * 2)
    assert all(x.size == 1 for x in jax.tree.leaves(final.opt_state) if x.ndim == 0)


def test_lr_multiplier_scales_the_first_adam_step():
    # Adam's first bias-corrected step moves every element with a nonzero gradient by lr * mult
    # (m / sqrt(v) = g / |g|), so the largest move per part reads the multiplier back.
    _, initial, final, _ = _train(phases.PhaseConfig("instruct", vision_lr_mult=0.1), steps=1)
    init, moved = _flat(initial.trainable), _flat(final.trainable)
    vision = max(np.abs(moved[p] - init[p]).max() for p in moved if p.startswith("vision_tower/encoder"))
    llm = max(np.abs(moved[p] - init[p]).max() for p in moved if p.startswith("llm/"))
    np.testing.assert_allclose(vision, 0.1 * LR, rtol=1e-3)
    np.testing.assert_allclose(llm, LR, rtol=1e-3)


def test_lora_trains_adapters_on_a_frozen_llm():
    lora = LoraConfig(rank=2, alpha=4.0)
    plan, initial, final, metrics = _train(phases.PhaseConfig("instruct", lora=lora), steps=3)
    assert set(final.trainable) == {"projector", "lora"}
    base = _flat(_base_params())
    for path, value in _flat(final.frozen).items():
        np.testing.assert_array_equal(value, base[path], err_msg=path)  # base LLM untouched
    adapters = _flat(final.lora)
    assert {p.rsplit("/", 1)[0] for p in adapters} == {
        f"llm/layers/{m}/kernel" for m in ("attention/q", "attention/k", "attention/v", "attention/o",
                                          "mlp/gate", "mlp/up", "mlp/down")}
    init_adapters = _flat(initial.lora)
    for path, value in adapters.items():
        assert not np.array_equal(value, init_adapters[path]), f"{path} did not change"
    assert all(not v.any() for p, v in init_adapters.items() if p.endswith("/b"))  # B starts at 0

    # merged kernel == W + alpha/r * A @ B, with A: [L, *in, r], B: [L, r, *out]
    merged = _flat(jax.tree.map(np.asarray, plan.model_params(jax.device_put(final))))
    for name, einsum in (("attention/q", "ldr,lrhk->ldhk"), ("attention/o", "lhkr,lrd->lhkd"),
                         ("mlp/down", "lfr,lrd->lfd")):
        path = f"llm/layers/{name}/kernel"
        a, b = adapters[f"{path}/a"], adapters[f"{path}/b"]
        want = base[path].astype(np.float64) + lora.alpha / lora.rank * np.einsum(einsum, a, b)
        np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-6)
    assert "lora" not in merged
    # unadapted params come back as they are
    np.testing.assert_array_equal(merged["llm/embed/embedding"], base["llm/embed/embedding"])


def test_phase_config_errors_name_the_field():
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="model.text_tower"):
        plan_training(_config(text_tower=False),
                      TrainStepConfig(phase=phases.PhaseConfig("contrastive")), mesh)
    with pytest.raises(ValueError, match="vision_lr_mult"):
        phases.PhaseConfig("align", vision_lr_mult=0.1)
    with pytest.raises(ValueError, match="supported"):
        phases.PhaseConfig("pretrain")
    with pytest.raises(ValueError, match="micro_batches"):
        TrainStepConfig(phase=phases.PhaseConfig("contrastive"), micro_batches=2)


def test_param_group_rules_first_match_wins_and_unmatched_paths_are_listed():
    params = {"llm": {"embed": {"embedding": 0}, "lm_head": {"kernel": 0}}, "projector": {"w": 0}}
    values = param_groups.match_groups(params, [("llm/embed/.*", None), ("llm/.*", 2.0),
                                                (".*", 1.0)])
    assert values == {"llm": {"embed": {"embedding": None}, "lm_head": {"kernel": 2.0}},
                      "projector": {"w": 1.0}}
    with pytest.raises(ValueError, match="projector/w"):
        param_groups.match_groups(params, [("llm/.*", 1.0)])
    # config rules are prepended to the phase's own: this one freezes the LLM's embeddings
    phase = phases.PhaseConfig("lm", param_groups=[["llm/embed/.*", None]])
    mults = phases.lr_multipliers(params, phase)
    assert mults["llm"]["embed"]["embedding"] is None and mults["llm"]["lm_head"]["kernel"] == 1.0
