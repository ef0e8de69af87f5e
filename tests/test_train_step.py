"""The train step across meshes and batch splits: 1 device == 8-device fsdp x tensor (4 x 2) over 5
steps, 2 accumulated micro-batches == one batch, params born sharded, and the non-finite flag."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.errors import ConfigError
from vlm_jax.data.images import normalize_pixels
from vlm_jax.models.decoder import decoder_config
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.siglip import VisionConfig
from vlm_jax.models.vlm import VLMConfig
from vlm_jax.train import param_groups, phases
from vlm_jax.train.optimizer import (OptimizerConfig, make_schedule, optimizer_config,
                                     weight_decay_mask)
from vlm_jax.train.step import TrainStepConfig, create_train_state, make_train_step, plan_training

STEPS = 5
MESHES = {"one_device": (sharding.MeshConfig(), 1),
          "fsdp4_tensor2": (sharding.MeshConfig(data=1, fsdp=4, tensor=2), 8),
          "data2_fsdp2_tensor2": (sharding.MeshConfig(data=2, fsdp=2, tensor=2), 8)}


@pytest.fixture(scope="module")
def config():
    """Smaller than conftest's tiny_vlm_config: at this size 5 steps on 5 different batches
    lower the loss, which the mesh test checks (conftest's does not)."""
    return VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32,
                            use_head=False),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=decoder_config("llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=32),
        image_token_id=63)


def _batches(config, batch_size=8):
    """STEPS different batches with uneven loss-token counts per row."""
    rng = np.random.default_rng(0)
    n = config.tokens_per_image
    t = n + 8
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, 63, (batch_size, t)).astype(np.int32)
        ids[:, 1:1 + n] = config.image_token_id
        loss_mask = (rng.random((batch_size, t)) < np.linspace(0.1, 0.9, batch_size)[:, None])
        loss_mask[:, :1 + n] = False
        out.append(dict(input_ids=ids, target_ids=np.roll(ids, -1, 1),
                        loss_mask=loss_mask.astype(np.float32),
                        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)).copy(),
                        mask_ar=np.ones((batch_size, t), np.int32),
                        images=rng.integers(0, 256, (batch_size, 1, 16, 16, 3), dtype=np.uint8)))
    return out


@functools.lru_cache(maxsize=None)
def _setup(config, mesh_name, micro_batches, loss_chunk_size=128):
    mesh_config, num_devices = MESHES[mesh_name]
    mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:num_devices])
    optimizer = OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=2,
                                total_steps=10, weight_decay=0.1, grad_clip_norm=1.0)
    step_config = TrainStepConfig(phase=phases.PhaseConfig("instruct"), optimizer=optimizer,
                                  micro_batches=micro_batches, loss_chunk_size=loss_chunk_size)
    plan = plan_training(config, step_config, mesh)
    return plan, make_train_step(plan)


@functools.lru_cache(maxsize=None)
def _run(config, mesh_name, micro_batches, loss_chunk_size=128):
    """(metrics per step, final trainable params on the host) from the same init and batches."""
    plan, train_step = _setup(config, mesh_name, micro_batches, loss_chunk_size)
    state = create_train_state(plan, jax.random.key(0))
    metrics = []
    for batch in _batches(plan.model_config):
        state, m = train_step(state, sharding.global_batch(batch, plan.mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, jax.tree.map(np.asarray, state.trainable)


def test_eight_device_fsdp_tensor_mesh_matches_one_device(config):
    single, _ = _run(config, "one_device", 1)
    sharded, _ = _run(config, "fsdp4_tensor2", 1)
    for key in ("loss", "token_accuracy", "grad_norm", "lr", "num_loss_tokens"):
        np.testing.assert_allclose([m[key] for m in sharded], [m[key] for m in single], atol=1e-5,
                                   err_msg=key)
    assert single[-1]["loss"] < single[0]["loss"]
    assert [m["lr"] for m in single][:3] == pytest.approx([0.0, 1.5e-3, 3e-3])


def test_state_is_born_sharded_on_the_mesh(config):
    plan, _ = _setup(config, "fsdp4_tensor2", 1)
    state = create_train_state(plan, jax.random.key(0))
    q = state.trainable["llm"]["layers"]["attention"]["q"]["kernel"]   # [L, D, H, hd]
    assert tuple(q.sharding.spec)[1:3] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2, q.shape[3])
    # Adam's moments are sharded like their params
    for moment in jax.tree.leaves(state.opt_state):
        if moment.shape == q.shape:
            assert moment.sharding.spec == q.sharding.spec
    emb = state.trainable["llm"]["embed"]["embedding"]
    assert emb.addressable_shards[0].data.size == emb.size // 8
    # the frozen vision tower is sharded too (no whole copy on one device)
    patch = state.frozen["vision_tower"]["encoder"]["mlp"]["fc1"]["kernel"]  # [L, D, F]
    assert patch.addressable_shards[0].data.size == patch.size // 8


def _assert_same_training(got, want, rtol, param_atol):
    """Two `_run` results: the same metrics per step and the same final params."""
    (got_metrics, got_params), (want_metrics, want_params) = got, want
    for key in ("loss", "token_accuracy", "grad_norm", "num_loss_tokens"):
        np.testing.assert_allclose([m[key] for m in got_metrics], [m[key] for m in want_metrics],
                                   rtol=rtol, atol=1e-6, err_msg=key)
    flat_want = param_groups.flatten(want_params)
    for path, value in param_groups.flatten(got_params).items():
        np.testing.assert_allclose(value, flat_want[path], atol=param_atol, err_msg=path)


def test_two_micro_batches_equal_one_batch(config):
    _assert_same_training(_run(config, "fsdp4_tensor2", 2), _run(config, "fsdp4_tensor2", 1),
                          rtol=1e-6, param_atol=1e-6)


def test_unrolled_layers_and_small_loss_chunks_train_as_the_defaults(config):
    """The shapes recipe's speed settings change the program, not the training: every stack
    unrolled (`scan_unroll`), the fused loss in chunks of 3 positions (rows hold up to 7 loss
    tokens: several chunks, a ragged last one) and 2 micro-batches give the same 5 steps."""
    _assert_same_training(_run(dataclasses.replace(config, scan_unroll=2), "one_device", 2, 3),
                          _run(config, "one_device", 1), rtol=1e-5, param_atol=2e-6)


def test_scan_unroll_below_one_is_refused_naming_the_field(config):
    with pytest.raises(ConfigError, match=r"model.vision.scan_unroll=0"):
        dataclasses.replace(config.vision, scan_unroll=0)
    with pytest.raises(ConfigError, match=r"scan_unroll=0"):
        dataclasses.replace(config.llm, scan_unroll=0)
    with pytest.raises(ConfigError, match=r"train.loss_chunk_size=0"):
        TrainStepConfig(loss_chunk_size=0)


def test_nan_in_batch_or_params_sets_the_non_finite_flag_and_skips_the_update(config):
    plan, train_step = _setup(config, "one_device", 1)
    batch = _batches(plan.model_config)[0]

    state = create_train_state(plan, jax.random.key(0))
    state, metrics = train_step(state, sharding.global_batch(batch, plan.mesh))
    assert metrics["is_finite"] == 1.0
    before = jax.tree.map(np.asarray, state.trainable)
    bad = dict(batch, images=normalize_pixels(batch["images"]))  # floats: a NaN can be written
    bad["images"][3, 0, 2, 2, 0] = np.nan
    state, metrics = train_step(state, sharding.global_batch(bad, plan.mesh))
    assert metrics["is_finite"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.trainable), before)
    state, metrics = train_step(state, sharding.global_batch(batch, plan.mesh))
    assert metrics["is_finite"] == 1.0  # a skipped step leaves a usable state

    poisoned = jax.tree.map(np.asarray, state.trainable)
    poisoned["projector"] = jax.tree.map(lambda x: np.full_like(x, np.nan), poisoned["projector"])
    state = state.replace(trainable=jax.device_put(poisoned, plan.state_shardings.trainable))
    _, metrics = train_step(state, sharding.global_batch(batch, plan.mesh))
    assert metrics["is_finite"] == 0.0


def test_schedules_and_decay_mask_from_a_config_dict():
    base = dict(learning_rate=1.0, warmup_steps=4, total_steps=14, end_lr_ratio=0.1)
    steps = np.arange(15)
    warm = steps / 4
    frac = np.clip((steps - 4) / 10, 0, 1)
    want = {"cosine": 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)),
            "linear": 1.0 - 0.9 * frac,
            "constant": np.ones_like(frac)}
    for kind, after in want.items():
        schedule = make_schedule(optimizer_config({**base, "schedule": kind}))
        got = np.array([float(schedule(s)) for s in steps])
        np.testing.assert_allclose(got, np.where(steps < 4, warm, after), atol=1e-6, err_msg=kind)
    with pytest.raises(ValueError, match="train.optimizer.betas"):
        optimizer_config({"betas": (0.9, 0.95)})
    with pytest.raises(ValueError, match="schedule"):
        optimizer_config({"schedule": "step"})

    params = {"llm": {"embed": {"embedding": 0}, "layers": {"pre_mlp_norm": {"scale": 0},
                                                             "mlp": {"up": {"kernel": 0}}}},
              "projector": {"fc1": {"kernel": 0, "bias": 0}}}
    mask = weight_decay_mask(params, optimizer_config({}))
    assert mask == {"llm": {"embed": {"embedding": False},
                            "layers": {"pre_mlp_norm": {"scale": False}, "mlp": {"up": {"kernel": True}}}},
                    "projector": {"fc1": {"kernel": True, "bias": False}}}
    custom = optimizer_config({"weight_decay_rules": [["projector/.*", False]]})
    assert weight_decay_mask(params, custom)["projector"]["fc1"]["kernel"] is False


FAMILY_LLMS = {
    # small caps, so that they bite at this init's logit scale
    "gemma2": dict(attn_logit_softcap=2.0, final_logit_softcap=1.5),
    "gemma3": dict(final_logit_softcap=1.5),   # + q/k norms, local / global RoPE bases
}


def _packed_text_batch(batch_size=4, length=16):
    """Rows of two packed segments (10 + 6 tokens, positions restarting), both longer than the
    window of 4, with uneven loss masks."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (batch_size, length)).astype(np.int32)
    segment_ids = np.repeat([[1] * 10 + [2] * 6], batch_size, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(batch_size, 0)
    loss_mask = (rng.random((batch_size, length)) < 0.7).astype(np.float32)
    loss_mask[:, [9, 15]] = 0.0                        # a segment's last token has no target
    return dict(input_ids=ids, target_ids=np.roll(ids, -1, 1), loss_mask=loss_mask,
                positions=positions.astype(np.int32), mask_ar=np.ones_like(ids),
                segment_ids=segment_ids)


@pytest.mark.parametrize("family", sorted(FAMILY_LLMS))
def test_one_step_on_sliding_softcapped_families_lowers_the_loss(family):
    """Why: the train step must differentiate Gemma 2 / 3's soft-caps (attention logits; final
    logits through the fused CE), sliding windows over the scanned LayerSpecs (here on packed
    rows, positions restarting per segment), sandwich norms and q/k norms. Its loss equals the
    model's own forward (final soft-cap included) on the same params, every trainable leaf gets
    a gradient (weight decay off: a leaf only moves if its gradient is non-zero), and one step
    lowers the loss on the batch it saw. Text only (phase lm): the vision tower is not what this
    is about, and compiling it would double the test's time."""
    from vlm_jax.models.families.base import FULL, SLIDING
    from vlm_jax.models.vlm import VLM
    from vlm_jax.train import losses

    llm = decoder_config(family, vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=32, sliding_window=4,
                         layer_types=(SLIDING, FULL), **FAMILY_LLMS[family])
    model_config = VLMConfig(llm=llm)
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                total_steps=10, weight_decay=0.0, grad_clip_norm=1.0)
    plan = plan_training(model_config, TrainStepConfig(phase=phases.PhaseConfig("lm"),
                                                       optimizer=optimizer), mesh)
    train_step = make_train_step(plan)
    state = create_train_state(plan, jax.random.key(0))
    batch = _packed_text_batch()

    before = jax.tree.map(np.asarray, state.trainable)
    forward = jax.jit(lambda params, b: VLM(model_config).apply(
        {"params": params}, b["input_ids"], None, b["positions"], b["mask_ar"], b["segment_ids"]))
    logits = forward(param_groups.merge_trees(before, jax.tree.map(np.asarray, state.frozen)),
                     batch)
    assert float(np.abs(np.asarray(logits)).max()) <= llm.final_logit_softcap
    want_loss, _ = losses.next_token_loss(logits, batch["target_ids"], batch["loss_mask"])

    state, first = train_step(state, sharding.global_batch(batch, plan.mesh))
    assert first["is_finite"] == 1.0
    np.testing.assert_allclose(float(first["loss"]), float(want_loss), rtol=1e-5)
    after = param_groups.flatten(jax.tree.map(np.asarray, state.trainable))
    unchanged = [path for path, value in param_groups.flatten(before).items()
                 if np.array_equal(value, after[path])]
    assert not unchanged, f"no gradient reached {unchanged}"
    for name in ("post_attention_norm", "post_mlp_norm") + (
            ("attention/q_norm", "attention/k_norm") if family == "gemma3" else ()):
        assert any(f"layers/{name}/" in path for path in after), name

    _, second = train_step(state, sharding.global_batch(batch, plan.mesh))
    assert second["loss"] < first["loss"], (float(first["loss"]), float(second["loss"]))


def test_uint8_batches_train_exactly_as_host_normalised_floats(config):
    """Why / the pipeline hands images as uint8 (a quarter of f32's bytes to the device) and the
    jitted step normalises them (`step._pixels`): one step on the uint8 batch and on the same
    batch normalised on the host as before (`normalize_pixels` = `preprocess_image`'s last step)
    must give the same metrics and params, bit for bit."""
    plan, train_step = _setup(config, "one_device", 1)
    batch = _batches(plan.model_config)[0]
    assert batch["images"].dtype == np.uint8
    floats = dict(batch, images=normalize_pixels(batch["images"]))
    assert floats["images"].dtype == np.float32
    results = []
    for b in (batch, floats):
        state, metrics = train_step(create_train_state(plan, jax.random.key(0)),
                                    sharding.global_batch(b, plan.mesh))
        results.append(({k: float(v) for k, v in metrics.items()},
                        jax.tree.map(np.asarray, state.trainable)))
    assert results[0][0] == results[1][0]
    jax.tree.map(np.testing.assert_array_equal, results[0][1], results[1][1])


def test_no_involuntary_rematerialization_on_a_data_fsdp_tensor_mesh(config, capfd):
    """Why / with data and fsdp both > 1 the token-embedding lookup's rows came out sharded
    like the table (embed over fsdp) and XLA's SPMD partitioner logged "Involuntary full
    rematerialization" on its way to the batch sharding: the [B, T, D] rows replicated on every
    device. `TokenEmbedding` now states the layout that one all-to-all turns into the batch's;
    compiling and running the step must not log it (the partitioner writes to fd 2)."""
    plan, train_step = _setup(config, "data2_fsdp2_tensor2", 1)
    capfd.readouterr()
    state, metrics = train_step(create_train_state(plan, jax.random.key(0)),
                                sharding.global_batch(_batches(plan.model_config)[0], plan.mesh))
    assert np.isfinite(float(metrics["loss"]))
    logged = capfd.readouterr().err
    assert "involuntary" not in logged.lower(), logged[-2000:]
