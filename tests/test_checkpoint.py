"""Checkpoints: a state saved on a data=8 mesh restores onto fsdp4 x tensor2 and onto one device
with identical values (data-iterator position included), half-written checkpoints are never
picked up, a damaged one is reported and the previous one used, a checkpoint of another model or
another lr schedule is refused, and init_from takes only the named groups."""
import os

import jax
import numpy as np
import pytest

from vlm_jax import model_dir, sharding
from vlm_jax.train import checkpoint, init_from
from vlm_jax.train import run_config as config_lib
from vlm_jax.data.pipeline import build_pipeline
from vlm_jax.models.vlm import init_params
from vlm_jax.train import param_groups
from vlm_jax.train.tokenizer import build_tokenizer
from vlm_jax.train.step import TrainStepConfig, plan_training

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def _run_config(overrides=(), mesh=None, num_devices=8):
    config = config_lib.apply_overrides(config_lib.load_config_file(TINY), list(overrides))
    if mesh is not None:
        config.mesh = mesh
    return config_lib.build_run_config(config, num_devices)


def _plan(run, num_devices):
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:num_devices])
    step_config = TrainStepConfig(phase=run.train.phase, optimizer=run.train.optimizer)
    return plan_training(run.model, step_config, mesh)


def _random_state(plan, seed=0):
    """A TrainState of random values placed on the plan's shardings (no compile needed)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jax.device_put(
        rng.standard_normal(a.shape).astype(a.dtype) if a.dtype == np.float32
        else np.full(a.shape, 5, a.dtype), a.sharding), checkpoint.abstract_train_state(plan))


def _random_params(model_config, seed):
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_restore_onto_other_meshes_and_ignore_half_written(tmp_path):
    run = _run_config(mesh=dict(data=8, fsdp=1, tensor=1))
    tokenizer = build_tokenizer(run, str(tmp_path))
    plan = _plan(run, 8)
    state = _random_state(plan)  # random Adam moments too: zeros would restore from anything
    data_iter = build_pipeline(run.data, tokenizer)
    for _ in range(2):
        next(data_iter)
    saver = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=True,
                                    run_config=run.to_dict())
    saver.save(2, state, data_iter.get_state())
    saver.close()
    expected_state, expected_batch = _host(state), next(data_iter)

    # A crash mid-save: orbax's tmp directory, and a step directory without a commit stamp.
    os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000" / "state")
    os.makedirs(tmp_path / "checkpoints" / "6" / "state")
    (tmp_path / "checkpoints" / "6" / "state" / "junk").write_text("half")

    for mesh, num_devices in ((dict(data=1, fsdp=4, tensor=2), 8), (dict(data=1), 1)):
        target_run = _run_config(mesh=mesh, num_devices=num_devices)
        target_plan = _plan(target_run, num_devices)
        loader = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=True,
                                         run_config=target_run.to_dict())
        assert loader.latest_step() == 2
        fresh_iter = build_pipeline(target_run.data, tokenizer)
        abstract = checkpoint.abstract_train_state(target_plan)
        restored = loader.restore(2, abstract, fresh_iter)
        loader.close()
        for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(expected_state),
                                     jax.tree.leaves(abstract)):
            assert got.sharding == target.sharding
            np.testing.assert_array_equal(np.asarray(got), want)
        batch = next(fresh_iter)
        for key in expected_batch:
            np.testing.assert_array_equal(batch[key], expected_batch[key])
    assert not (tmp_path / "checkpoints" / "6").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run = _run_config(num_devices=8)
    plan = _plan(run, 8)
    saver = checkpoint.Checkpointer(str(tmp_path), 1, False, run.to_dict())
    saver.save(1, _random_state(plan), None)
    saver.close()
    other = _run_config(["model.llm.mlp_dim=128"], num_devices=8)
    loader = checkpoint.Checkpointer(str(tmp_path), 1, False, other.to_dict())
    with pytest.raises(ValueError, match=r"model\.llm\.mlp_dim: checkpoint 64 vs config 128"):
        loader.restore(1, checkpoint.abstract_train_state(_plan(other, 8)), None)
    loader.close()


def test_init_from_takes_only_named_groups(tmp_path):
    source_run = _run_config(num_devices=8)
    source_params = _random_params(source_run.model, seed=7)
    model_dir.save_model(str(tmp_path / "source"), source_run.model, source_params)
    run = _run_config([f"train.init_from.path={tmp_path / 'source'}",
                       "train.init_from.groups=('vision_tower/.*', 'llm/embed/.*')"], num_devices=8)
    plan = _plan(run, 8)
    fresh = _random_state(plan, seed=1)
    state = init_from.apply_init_from(run, plan, fresh)
    got = param_groups.flatten(_host(param_groups.merge_trees(state.trainable, state.frozen)))
    want = param_groups.flatten(source_params)
    before = param_groups.flatten(_host(param_groups.merge_trees(fresh.trainable, fresh.frozen)))
    taken = [p for p in got if p.startswith(("vision_tower/", "llm/embed/"))]
    assert taken and len(taken) < len(got)
    for path in got:
        np.testing.assert_array_equal(got[path], want[path] if path in taken else before[path])
    leaves = zip(jax.tree.leaves(state), jax.tree.leaves(checkpoint.abstract_train_state(plan)))
    assert all(leaf.sharding == target.sharding for leaf, target in leaves)


def test_init_from_shape_mismatch_names_the_param(tmp_path):
    source_run = _run_config(["model.llm.mlp_dim=48"], num_devices=8)
    model_dir.save_model(str(tmp_path / "source"), source_run.model,
                         _random_params(source_run.model, seed=0))
    with pytest.raises(ValueError, match=r"param llm/layers/mlp/\w+/kernel has shape"):
        init_from.check_init_from(_run_config([f"train.init_from.path={tmp_path / 'source'}",
                                               "train.init_from.groups=('llm/.*',)"]))
    # The vision tower alone is compatible: no error.
    init_from.check_init_from(_run_config([f"train.init_from.path={tmp_path / 'source'}",
                                           "train.init_from.groups=('vision_tower/.*',)"]))


def test_init_from_a_finished_workdir_finds_its_model_dir(tmp_path):
    """A workdir has its own config.json (the run config) next to model/: model/ wins."""
    workdir = tmp_path / "run"
    (workdir / "model" / "params").mkdir(parents=True)
    (workdir / "model" / "config.json").write_text("{}")
    (workdir / "config.json").write_text("{}")
    assert model_dir.resolve_model_dir(str(workdir), "--checkpoint") == str(workdir / "model")
    assert model_dir.resolve_model_dir(str(workdir / "model"), "--checkpoint") == str(workdir / "model")
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="did not finish"):
        model_dir.resolve_model_dir(str(tmp_path / "unfinished"), "--checkpoint")


def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    """Why / Interrupts and damaged files (issue "nothing lost"): a truncated shard in the latest
    checkpoint gave a 460-line traceback instead of falling back to the previous one."""
    run = _run_config(num_devices=8)
    plan = _plan(run, 8)
    states = {step: _random_state(plan, seed=step) for step in (1, 2)}
    saver = checkpoint.Checkpointer(str(tmp_path), 3, False, run.to_dict())
    for step, state in states.items():
        saver.save(step, state, None)
    saver.close()
    # Truncate step 2's largest array data file (orbax's OCDBT data under state/).
    with open(_largest_file(tmp_path / "checkpoints" / "2" / "state"), "r+b") as f:
        f.truncate(100)

    loader = checkpoint.Checkpointer(str(tmp_path), 3, False, run.to_dict())
    with caplog.at_level("WARNING"):
        restored, step = loader.restore_latest(checkpoint.abstract_train_state(plan), None)
    loader.close()
    assert step == 1
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_host(states[1]))):
        np.testing.assert_array_equal(np.asarray(got), want)
    (line,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "checkpoints/2 is damaged" in line and "resuming from step 1" in line
    assert "\n" not in line
    # Moved aside (kept, and out of the way of the run's own save of step 2).
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert os.listdir(tmp_path / "damaged_checkpoints") == ["2"]

    # No checkpoint restores: refused naming the workdir, nothing moved or deleted.
    with open(_largest_file(tmp_path / "checkpoints" / "1" / "state"), "r+b") as f:
        f.truncate(100)
    loader = checkpoint.Checkpointer(str(tmp_path), 3, False, run.to_dict())
    with pytest.raises(ValueError, match=rf"workdir {tmp_path}: no checkpoint restores \(step 1: "
                                         rf".*delete or move {tmp_path}/checkpoints"):
        loader.restore_latest(checkpoint.abstract_train_state(plan), None)
    loader.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


@pytest.mark.parametrize("override, shown", [
    ("train.steps=30", r"train\.steps: checkpoint 20 vs config 30, train\.optimizer\.total_steps: "
                       r"checkpoint 20 vs config 30"),
    ("train.optimizer.learning_rate=1e-3",
     r"train\.optimizer\.learning_rate: checkpoint 0\.003 vs config 0\.001"),
    ("train.optimizer.warmup_steps=5", r"train\.optimizer\.warmup_steps: checkpoint 2 vs config 5"),
])
def test_resume_under_another_schedule_is_refused_unless_allowed(tmp_path, caplog, override,
                                                                 shown):
    """Why / Quieter traps (issue "nothing lost"): resuming with more train.steps recomputed the
    cosine schedule (the lr jumped from 1.9e-7 back to 3.4e-4) without a word."""
    run = _run_config(num_devices=8)
    plan = _plan(run, 8)
    state = _random_state(plan)
    saver = checkpoint.Checkpointer(str(tmp_path), 1, False, run.to_dict())
    saver.save(4, state, None)
    saver.close()
    changed = _run_config([override], num_devices=8).to_dict()
    abstract = checkpoint.abstract_train_state(plan)
    loader = checkpoint.Checkpointer(str(tmp_path), 1, False, changed)
    with pytest.raises(checkpoint.IncompatibleCheckpoint,
                       match=rf"another schedule \({shown}\).*--allow-schedule-change"):
        loader.restore_latest(abstract, None)
    loader.close()
    assert os.listdir(tmp_path / "checkpoints") == ["4"]  # refused, not taken for damage

    loader = checkpoint.Checkpointer(str(tmp_path), 1, False, changed, allow_schedule_change=True)
    with caplog.at_level("WARNING"):
        restored, step = loader.restore_latest(abstract, None)
    loader.close()
    assert step == 4 and int(restored.step) == int(state.step)
    assert any("changed schedule" in r.getMessage() for r in caplog.records)


def test_resume_with_other_log_and_checkpoint_settings_is_allowed():
    run = _run_config(num_devices=8)
    other = _run_config(["log.every_steps=1", "checkpoint.every_steps=3", "train.seed=1"],
                        num_devices=8)
    assert checkpoint.check_compatible(run.to_dict(), other.to_dict(), "here") == []


def test_a_checkpoint_that_predates_new_decoder_fields_still_resumes():
    """Why / a run checkpointed before the family switches existed (no layer_types, qk_norm, ...
    in its saved config) resumes: absent fields take the family's value, as they had then; a
    real difference is still refused."""
    run = _run_config(num_devices=8)
    saved = run.to_dict()
    for field in ("layer_types", "qk_norm", "post_norms", "sliding_window", "nope_layers",
                  "query_pre_attn_scalar", "rope_scaling_type"):
        del saved["model"]["llm"][field]
    assert checkpoint.check_compatible(saved, run.to_dict(), "here") == []
    saved["model"]["llm"]["num_layers"] += 1
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="model.llm.num_layers"):
        checkpoint.check_compatible(saved, run.to_dict(), "here")


def test_asyncio_reports_of_abandoned_orbax_reads_are_dropped_and_nothing_else():
    """Why / under load a damaged checkpoint's one-line refusal came with a traceback: asyncio
    logs "Task (or _GatheringFuture) exception was never retrieved" for the orbax reads a
    failed restore abandons.
    Exactly those records are dropped; any other asyncio error is still logged."""
    import logging
    import sys

    scope = {}
    exec(compile("def read():\n    raise Exception('Encountered error while reading')\n",
                 os.path.join(os.sep, "site-packages", "orbax", "serialization.py"), "exec"), scope)

    def record(fn, msg="Task exception was never retrieved\nfuture: <Task finished>"):
        try:
            fn()
        except Exception:
            return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                     sys.exc_info())

    def ours():
        raise ValueError("not orbax")
    assert checkpoint._drop_abandoned_orbax_task(record(scope["read"])) is False
    assert checkpoint._drop_abandoned_orbax_task(record(ours)) is True
    assert checkpoint._drop_abandoned_orbax_task(record(scope["read"], "another error")) is True
    # The gather that collects those reads is reported the same way (failed CI stop 26).
    gathered = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>"
    assert checkpoint._drop_abandoned_orbax_task(record(scope["read"], gathered)) is False
    assert checkpoint._drop_abandoned_orbax_task(record(ours, gathered)) is True
