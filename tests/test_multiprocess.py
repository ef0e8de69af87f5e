"""Multi-process training on one machine: two processes with 4 fake CPU devices each (gloo
collectives) run `vlm-jax train --coordinator/--num-processes/--process-id` as one 8-device FSDP
run of configs/tiny.py, and the result is checked against a single-process 8-device run:

  * per-step losses agree within 1e-5 (same global batches: no shuffle, no packing, so the pair's
    interleaved process shards hold exactly the single run's examples at every step);
  * only process 0 wrote logs (one metrics row per step, one TensorBoard file), every process
    wrote its checkpoint shards;
  * the pair's checkpoint restores in one process, and the single run's restores in the pair,
    both equal to the state the other side trained.

Plus the flag validation and cluster detection of vlm_jax/distributed.py.

Run as a script, this file is the pair's restore worker (see `_restore_worker`).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARG = os.path.join(ROOT, "configs", "tiny.py") + ":phase=instruct,steps={steps},batch={batch}"
STEPS = 4
# Identical global batches in both runs (see the module docstring); fsdp=8 shards the params over
# both processes, so the train step all-gathers across them.
OVERRIDES = ["data.shuffle=False", "data.packing=False", "mesh.data=1", "mesh.fsdp=8",
             "log.every_steps=1", "log.progress_bar=False", f"checkpoint.every_steps={STEPS}",
             "eval_data=None"]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # conftest's XLA flags, but not a forced host device count: it would override the 4 devices
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    return env


def _start_pair(command: list[str], cwd: str) -> list[subprocess.Popen]:
    """Start `command + [--coordinator ..., --num-processes 2, --process-id i]` twice."""
    coordinator = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(command + ["--coordinator", coordinator, "--num-processes", "2",
                                        "--process-id", str(i)],
                             cwd=cwd, env=_pair_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait_pair(procs: list[subprocess.Popen]) -> list[str]:
    """The pair's outputs, or a failure showing both when either exits non-zero."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:  # a peer that died leaves the other waiting in a collective
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if any(proc.returncode for proc in procs):
        pytest.fail("\n".join(f"process {i} exited {p.returncode}:\n{out[-4000:]}"
                              for i, (p, out) in enumerate(zip(procs, outputs + ["", ""]))))
    return outputs


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == len({r["step"] for r in train_rows}), "a step was logged twice"
    return {r["step"]: r["loss"] for r in train_rows}


def _restore(workdir, mesh_devices):
    """The TrainState of `workdir`'s checkpoint STEPS on an fsdp mesh over `mesh_devices`
    (the current process's view), data iterator left alone."""
    import jax

    from vlm_jax import sharding
    from vlm_jax.train import checkpoint
    from vlm_jax.train import run_config as config_lib
    from vlm_jax.train.step import TrainStepConfig, plan_training
    config = config_lib.load_config_file(TINY_ARG.format(steps=STEPS, batch=8))
    config = config_lib.apply_overrides(config, OVERRIDES)
    run = config_lib.build_run_config(config, len(mesh_devices), jax.process_count())
    mesh = sharding.make_mesh(run.mesh, devices=mesh_devices)
    plan = plan_training(run.model, TrainStepConfig(phase=run.train.phase,
                                                    optimizer=run.train.optimizer), mesh)
    loader = checkpoint.Checkpointer(str(workdir), keep=2, async_save=False,
                                     run_config=run.to_dict())
    try:
        assert loader.latest_step() == STEPS
        return loader.restore(STEPS, checkpoint.abstract_train_state(plan), None)
    finally:
        loader.close()


def _flat_host(state) -> dict[str, np.ndarray]:
    import jax
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _restore_worker(argv: list[str]) -> None:
    """`python tests/test_multiprocess.py WORKDIR OUT.npz --coordinator ... --num-processes 2
    --process-id I`: restore WORKDIR's checkpoint onto the pair's 8-device mesh; process 0
    writes the gathered arrays to OUT.npz."""
    workdir, out = argv[0], argv[1]
    flags = dict(zip(argv[2::2], argv[3::2]))
    from vlm_jax import distributed
    distributed.initialize(flags["--coordinator"], int(flags["--num-processes"]),
                           int(flags["--process-id"]))
    import jax
    from jax.experimental import multihost_utils
    state = _restore(workdir, jax.devices())
    sharded = [leaf for leaf in jax.tree.leaves(state) if not leaf.is_fully_addressable]
    assert sharded, "expected params sharded across both processes on the fsdp=8 mesh"
    gathered = multihost_utils.process_allgather(state, tiled=True)
    if jax.process_index() == 0:
        np.savez(out, **_flat_host(gathered))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(pair workdir, single workdir) after STEPS steps each."""
    from vlm_jax import cli
    base = tmp_path_factory.mktemp("multiprocess")
    pair_dir, single_dir = base / "pair", base / "single"
    overrides = [f"--config.{o}" for o in OVERRIDES]
    pair = _start_pair([sys.executable, "-m", "vlm_jax.cli", "train", "--config",
                        TINY_ARG.format(steps=STEPS, batch=8), "--workdir", str(pair_dir),
                        *overrides], cwd=ROOT)
    try:
        # The single-process reference runs meanwhile in this process: 8 fake devices
        # (conftest), batch 16 = the pair's 2 x 8.
        assert cli.main(["train", "--config", TINY_ARG.format(steps=STEPS, batch=16),
                         "--workdir", str(single_dir), *overrides]) == 0
    finally:
        _wait_pair(pair)
    return pair_dir, single_dir


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pair_trains_like_one_process(runs):
    pair_dir, single_dir = runs
    pair, single = _losses(pair_dir), _losses(single_dir)
    assert sorted(pair) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        assert abs(pair[step] - single[step]) < 1e-5, (step, pair[step], single[step])
    assert len(set(single.values())) == STEPS  # the losses move: a real comparison

    # Process 0 alone wrote the logs; both processes wrote checkpoint shards (orbax's layout).
    assert len(os.listdir(pair_dir / "tensorboard")) == 1
    state_dir = pair_dir / "checkpoints" / str(STEPS) / "state"
    for process in (0, 1):
        assert os.listdir(state_dir / f"ocdbt.process_{process}" / "d"), process
    assert os.path.exists(pair_dir / "model" / "config.json")
    assert os.path.exists(pair_dir / "tokenizer" / "tokenizer.json")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoints_cross_between_pair_and_one_process(runs, tmp_path):
    import jax
    pair_dir, single_dir = runs
    # The pair's checkpoint in this (single) process == the single run's own state.
    from_pair = _flat_host(_restore(pair_dir, jax.devices()))
    from_single = _flat_host(_restore(single_dir, jax.devices()))
    assert from_pair.keys() == from_single.keys()
    for key in from_single:
        np.testing.assert_allclose(from_pair[key], from_single[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    assert int(from_pair[".step"]) == STEPS

    # The single run's checkpoint restored in the pair == the same arrays.
    out = tmp_path / "restored_in_pair.npz"
    _wait_pair(_start_pair([sys.executable, os.path.abspath(__file__), str(single_dir), str(out)],
                           cwd=ROOT))
    in_pair = np.load(out)
    assert set(in_pair.files) == from_single.keys()
    for key in from_single:
        np.testing.assert_array_equal(in_pair[key], from_single[key], err_msg=key)


# ----------------------------------------------------------------------------- flags, detection

def test_explicit_flags_are_validated():
    from vlm_jax import distributed
    assert distributed.check_explicit(None, None, None) is False
    assert distributed.check_explicit("10.0.0.2:8476", 4, 3) is True
    assert distributed.check_explicit("node-1.cluster:1234", 2, 0) is True
    with pytest.raises(ValueError, match="--num-processes, --process-id missing"):
        distributed.check_explicit("10.0.0.2:8476", None, None)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        distributed.check_explicit("10.0.0.2", 2, 0)
    with pytest.raises(ValueError, match=r"--process-id=2: must be in \[0, 2\)"):
        distributed.check_explicit("10.0.0.2:8476", 2, 2)


def test_cli_names_a_missing_flag(capsys):
    from vlm_jax import cli
    code = cli.main(["train", "--config", TINY_ARG.format(steps=1, batch=8), "--workdir",
                     "/nonexistent", "--coordinator", "127.0.0.1:1234"])
    assert code == 2
    assert "--num-processes, --process-id missing" in capsys.readouterr().err


SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({**SLURM_STEP, "SLURM_NTASKS": "2"}, "slurm"),
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, None),               # one task: a single machine
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}, None),       # the batch script, not a step
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
])
def test_detect_cluster(environ, expected, monkeypatch):
    from vlm_jax import distributed
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: False)
    assert distributed.detect_cluster(environ) == expected


def test_slurm_one_task_per_node_gets_all_node_gpus():
    from vlm_jax import distributed
    per_node = {**SLURM_STEP, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2"}
    assert distributed.slurm_local_device_ids({**per_node, "SLURM_GPUS_ON_NODE": "8"}) == \
        list(range(8))
    assert distributed.slurm_local_device_ids({**per_node, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == \
        [0, 1, 2, 3]
    assert distributed.slurm_local_device_ids(per_node) is None  # CPU nodes: all devices anyway
    per_gpu = {**SLURM_STEP, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2",
               "SLURM_GPUS_ON_NODE": "8"}
    assert distributed.slurm_local_device_ids(per_gpu) is None  # JAX's default: one GPU a task


if __name__ == "__main__":
    _restore_worker(sys.argv[1:])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pair_trains_one_epoch_and_stops_together(tmp_path):
    # 41 examples, one per row (no packing), 4 rows per process: the shards (21 and 20 examples) make 6 and
    # 5 batches. The process that runs out first feeds empty batches until the other is done, so
    # both stop at the same step (else one would wait forever in a collective) and every
    # example is trained on exactly once.
    source = ("[{'kind': 'shapes', 'options': {'split': 'train', 'image_size': 32, 'task': 'qa', "
              "'turns_per_example': 1, 'num_examples': 41}}]")
    overrides = [f"--config.{o}" for o in (
        "train.steps=None", "train.epochs=1", "train.optimizer.warmup_steps=0",
        f"data.sources={source}", "data.seq_len=48", "data.packing=False", "mesh.data=8",
        "mesh.fsdp=1",
        "log.every_steps=1", "log.progress_bar=False", "eval_data=None",
        "checkpoint.every_steps=100")]
    _wait_pair(_start_pair([sys.executable, "-m", "vlm_jax.cli", "train", "--config",
                            TINY_ARG.format(steps=1, batch=4), "--workdir",
                            str(tmp_path / "pair"), *overrides], cwd=ROOT))
    rows = [json.loads(line) for line in open(tmp_path / "pair" / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert [r["num_examples"] for r in train_rows] == [8] * 5 + [1]
    assert train_rows[-1]["examples_seen"] == 41 and train_rows[-1]["epoch"] == 1.0
    state_dir = tmp_path / "pair" / "checkpoints" / "6" / "state"
    for process in (0, 1):  # both saved the last step
        assert os.listdir(state_dir / f"ocdbt.process_{process}" / "d"), process
    assert os.path.exists(tmp_path / "pair" / "model" / "config.json")
