"""Image-text matching (BLIP): hard negatives drawn from the contrastive similarities on an
8-device mesh (never a caption equal to the positive, the same draw as one device), the ITM step
on one device and on a mesh, and the phases' rules and checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.errors import ConfigError
from vlm_jax.eval import tasks
from vlm_jax.models.decoder import decoder_config
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.siglip import TextTowerConfig, VisionConfig
from vlm_jax.models.vlm import VLM, VLMConfig, init_params, itm_inputs
from vlm_jax.train import flops, losses, phases
from vlm_jax.train.optimizer import OptimizerConfig
from vlm_jax.train.step import (TrainStepConfig, batch_loss, create_train_state, make_train_step,
                                plan_training)

VOCAB, TEXT_LEN, BATCH = 64, 6, 8


def _config(itm_head=True, **fields):
    return VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                            mlp_dim=32, use_head=True),
        text_tower=TextTowerConfig(vocab_size=VOCAB, width=16, depth=1, num_heads=2, mlp_dim=32,
                                   max_len=TEXT_LEN, projection_dim=16),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=decoder_config("llama", vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=32),
        image_token_id=VOCAB - 1, itm_head=itm_head, **fields)


def _pairs(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, TEXT_LEN + 1, batch).astype(np.int32)
    text_ids = np.zeros((batch, TEXT_LEN), np.int32)
    for row, length in enumerate(lengths):
        text_ids[row, :length] = rng.integers(1, VOCAB - 1, length)
    text_ids[3] = text_ids[5]  # two rows with the same caption: never each other's negative
    lengths[3] = lengths[5]
    return dict(images=rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8),
                text_ids=text_ids, text_lengths=lengths)


def _mesh(name):
    if name == "one":
        return sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))


def test_hard_negatives_follow_the_similarities_and_skip_equal_captions():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(BATCH, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    text_ids = np.arange(BATCH * 3, dtype=np.int32).reshape(BATCH, 3)
    text_ids[3] = text_ids[5]
    mesh = _mesh("data2_fsdp4")
    with sharding.rules_context(mesh):
        draw = jax.jit(lambda key, scale: losses.hard_negatives(
            jnp.asarray(z), jnp.asarray(z), jnp.asarray(text_ids), scale, key, mesh))
        counts = np.zeros((BATCH, BATCH))
        for seed in range(300):
            neg_text, neg_image, text_ok, image_ok = map(np.asarray, draw(
                jax.random.key(seed), jnp.full((1,), np.log(5.0), jnp.float32)))
            counts[np.arange(BATCH), neg_text] += 1
            assert text_ok.all() and image_ok.all()
            assert neg_text[3] != 5 and neg_text[5] != 3 and neg_image[3] != 5
            assert (neg_text != np.arange(BATCH)).all() and (neg_image != np.arange(BATCH)).all()
        # a very low temperature picks the most similar other caption
        neg_text = np.asarray(draw(jax.random.key(0), jnp.full((1,), 8.0, jnp.float32))[0])
    similarity = z @ z.T
    same = (text_ids[:, None] == text_ids[None]).all(-1)
    np.testing.assert_array_equal(neg_text, np.where(same, -np.inf, similarity).argmax(1))
    # frequencies follow softmax(5 * similarity) over the allowed captions
    want = np.exp(5 * similarity) * ~same
    want /= want.sum(1, keepdims=True)
    assert np.abs(counts / 300 - want).max() < 0.12


def test_itm_logits_read_each_pair_at_its_last_caption_token():
    config = _config()
    params = init_params(config, jax.random.key(0))
    pairs = _pairs()
    ids, last = itm_inputs(config, jnp.asarray(pairs["text_ids"]), jnp.asarray(pairs["text_lengths"]))
    assert ids.shape == (BATCH, config.tokens_per_image + TEXT_LEN)
    np.testing.assert_array_equal(np.asarray(last),
                                  config.tokens_per_image + pairs["text_lengths"] - 1)
    images = jnp.asarray(pairs["images"], jnp.float32) / 127.5 - 1
    order = jnp.array([2, 0, 1, 7])
    itm = jax.jit(lambda *args: VLM(config).apply({"params": params}, *args,
                                                   method=VLM.itm_logits))
    logits = itm(ids[order], images, last[order], order)
    # the same as pair by pair, and padding after the last token changes nothing (causal)
    for k, row in enumerate(np.asarray(order)):
        padded = ids[row:row + 1].at[0, int(last[row]) + 1:].set(0)
        alone = itm(padded, images[row:row + 1], last[row:row + 1], jnp.zeros(1, jnp.int32))
        np.testing.assert_allclose(np.asarray(logits[k]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.parametrize("phase", ["itm", "contrastive+itm"])
def test_itm_step_trains_and_a_mesh_matches_one_device(phase):
    config = _config()
    results = {}
    for mesh_name in ("one", "data2_fsdp4"):
        mesh = _mesh(mesh_name)
        step_config = TrainStepConfig(phase=phases.PhaseConfig(phase),
                                      optimizer=OptimizerConfig(learning_rate=3e-3,
                                                                warmup_steps=1, total_steps=20))
        plan = plan_training(config, step_config, mesh)
        step = make_train_step(plan)
        state = create_train_state(plan, jax.random.key(0))
        history = []
        for k in range(4):
            state, metrics = step(state, sharding.global_batch(_pairs(k % 2), mesh))
            history.append({name: float(v) for name, v in metrics.items()})
        results[mesh_name] = history
        trainable = set(state.trainable)
    want = {"itm_head", "projector", "llm"} | (
        {"vision_tower", "text_tower", "contrastive"} if phase == "contrastive+itm" else set())
    assert trainable == want
    one, mesh = results["one"], results["data2_fsdp4"]
    for a, b in zip(one, mesh):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-4)
        assert a["itm_accuracy"] == b["itm_accuracy"]
    assert one[2]["loss"] < one[0]["loss"]  # the same batch again, after two updates
    assert all(0.0 <= h["itm_accuracy"] <= 1.0 for h in one)


def _negatives(pairs, k=2, seed=7):
    """Each row's caption with k tokens changed: data-provided hard negatives [B, k, L]."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(pairs["text_ids"][:, None], k, axis=1)
    for row, length in enumerate(pairs["text_lengths"]):
        for j in range(k):
            ids[row, j, rng.integers(length)] = rng.integers(1, VOCAB - 1)
    return dict(pairs, negative_text_ids=ids,
                negative_text_lengths=np.repeat(pairs["text_lengths"][:, None], k, axis=1))


@pytest.mark.parametrize("mesh_name", ["one", "data2_fsdp4"])
def test_itm_loss_adds_each_image_with_its_data_negatives(mesh_name):
    """With negative_text_ids the loss is the drawn-negative loss plus, for each image, its K
    captions as label-0 pairs against that image (checked against the logits computed apart)."""
    config, k = _config(), 2
    mesh = _mesh(mesh_name)
    plan = plan_training(config, TrainStepConfig(phase=phases.PhaseConfig("itm")), mesh)
    params = init_params(config, jax.random.key(1))
    pairs = _negatives(_pairs())
    with sharding.rules_context(mesh, plan.rules):
        run = jax.jit(lambda p, b: batch_loss(plan, p, b, rng=jax.random.key(3)))
        loss, sums = run(params, sharding.global_batch(pairs, mesh))
        base = {key: pairs[key] for key in ("images", "text_ids", "text_lengths")}
        loss0, sums0 = run(params, sharding.global_batch(base, mesh))
    ids, last = itm_inputs(config, jnp.asarray(pairs["negative_text_ids"].reshape(BATCH * k, -1)),
                           jnp.asarray(pairs["negative_text_lengths"].reshape(-1)))
    images = jnp.asarray(pairs["images"], jnp.float32) / 127.5 - 1
    logits = np.asarray(VLM(config).apply({"params": params}, ids, images, last,
                                          jnp.repeat(jnp.arange(BATCH), k),
                                          method=VLM.itm_logits))
    pairs0 = float(sums0["itm_pairs"])
    assert float(sums["itm_pairs"]) == pairs0 + BATCH * k
    want = (float(loss0) * pairs0 + np.logaddexp(0, logits).sum()) / (pairs0 + BATCH * k)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert float(sums["itm_correct"]) == float(sums0["itm_correct"]) + np.sum(logits <= 0)


def test_itm_phases_check_the_model_and_their_weights():
    with pytest.raises(ConfigError, match="model.itm_head=True"):
        phases.check_model_fits(phases.PhaseConfig("itm"), _config(itm_head=False))
    with pytest.raises(ConfigError, match="contrastive_weight"):
        phases.PhaseConfig("itm", contrastive_weight=0.5)
    with pytest.raises(ConfigError, match="itm_weight"):
        phases.PhaseConfig("instruct", itm_weight=2.0)
    with pytest.raises(ConfigError, match="itm_head=True needs"):
        VLMConfig(vision=_config().vision, itm_head=True)
    assert phases.PhaseConfig("contrastive+itm").step_kind == "itm"
    assert flops.missing_flop_formula(_config(), "itm") is not None


def test_rerank_orders_the_candidates_by_their_matching_logit():
    similarity = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]])
    logits = {(0, 0): -1.0, (0, 1): 2.0, (0, 3): 0.5, (1, 3): 0.0, (1, 2): 3.0, (1, 1): 1.0}
    score = lambda queries, items: np.array([logits[q, i] for q, i in zip(queries, items)])  # noqa
    ranked = tasks.rerank(score, similarity, candidates=3)
    assert np.argsort(-ranked[0]).tolist() == [1, 3, 0, 2]  # 2 was not a candidate: last
    assert np.argsort(-ranked[1]).tolist() == [2, 1, 3, 0]
    same = np.eye(4, dtype=bool)[:2]
    assert tasks.itm_accuracy(lambda q, i: np.where(q == i, 1.0, -1.0), similarity[:, :2],
                              same[:, :2]) == 1.0


def test_itm_run_trains_and_eval_reports_matching_and_reranked_retrieval(tmp_path):
    import contextlib
    import io
    import json
    from vlm_jax.cli import main as cli_main
    work = str(tmp_path / "itm")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["train", "--config", "configs/tiny.py:phase=itm,steps=3",
                         "--workdir", work]) == 0
        out = str(tmp_path / "eval")
        assert cli_main(["eval", "--config", "configs/tiny.py:phase=itm", "--checkpoint",
                         work + "/model", "--num-examples", "12", "--batch-size", "5",
                         "--out", out]) == 0
    metrics = json.load(open(out + "/results.json"))["metrics"]
    for key in ("itm_accuracy", "image_to_text_itm_r@1", "text_to_image_itm_r@5",
                "image_to_text_r@1"):
        assert 0.0 <= metrics[key] <= 1.0, key
