"""Exact resume across processes (`python -m vlm_jax.cli train` in a subprocess): a run stopped
at a random step (wherever the signal lands) and resumed ends bit-identical to the uninterrupted
run (final params and every step's batch, replayed steps included): after SIGKILL (resumed from
the last complete checkpoint); after SIGTERM, which saves at the next step boundary and exits
cleanly, the resumed run starting right after that step; and after Ctrl-C, which saves the same
way and exits with 130 in one line (a damaged checkpoint then refuses the re-run in one line;
intact, the same command resumes)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vlm_jax import model_dir

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # 2-4 training processes a test

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 16
EVERY = 3  # checkpoint.every_steps
# Steps dispatched before the signal is sent: checkpoint EVERY is complete by then (a save waits
# for the one before it), and the run has STEPS - SIGNAL_AFTER steps (~1 s) left, which the
# signal lands in.
SIGNAL_AFTER = 2 * EVERY + 1


def _command(workdir, steps=STEPS):
    return [sys.executable, "-m", "vlm_jax.cli", "train", "--config",
            os.path.join(ROOT, "configs", "tiny.py") + f":steps={steps}", "--workdir", workdir,
            f"--config.checkpoint.every_steps={EVERY}", "--config.log.batch_hash=true",
            "--config.log.progress_bar=false", "--config.log.tensorboard=false",
            "--config.eval_data=None"]


def _env():
    """This process's environment (conftest's compilation cache and XLA flags) for one CPU
    device: a forced host device count is dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=" ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                  if not flag.startswith("--xla_force_host_platform_device_count")))
    return env


def _hashes(workdir):
    path = os.path.join(workdir, "data_hashes.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.endswith("\n")]


def _run(workdir):
    done = subprocess.run(_command(workdir), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_and_signal(workdir, signum, command=None, after=SIGNAL_AFTER):
    """Start a run (`command`, default `_command(workdir)`), send `signum` once `after` steps
    are done; (returncode, stdout, stderr, steps done when the signal was sent)."""
    process = subprocess.Popen(command or _command(workdir), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_hashes(workdir)) < after:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert len(_hashes(workdir)) < STEPS, "the run finished before the signal landed"
    return process.returncode, stdout, stderr, after


def _params(workdir):
    _, params, _ = model_dir.load_model(os.path.join(workdir, "model"), load_tokenizer=False)
    return model_dir.numpy_params(params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    _run(workdir)
    hashes = {row["step"]: row["hash"] for row in _hashes(workdir)}
    assert sorted(hashes) == list(range(1, STEPS + 1))
    return hashes, _params(workdir)


def _check_same_as_straight(workdir, straight):
    hashes, params = straight
    for row in _hashes(workdir):  # every batch of every attempt, replays included
        assert row["hash"] == hashes[row["step"]], f"step {row['step']} saw other data"
    assert {row["step"] for row in _hashes(workdir)} == set(range(1, STEPS + 1))
    resumed = _params(workdir)
    flat_want, flat_got = _flatten(params), _flatten(resumed)
    assert flat_want.keys() == flat_got.keys()
    for path in flat_want:
        np.testing.assert_array_equal(flat_got[path], flat_want[path], err_msg=path)


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def test_sigkill_then_resume_is_bit_identical(tmp_path, straight):
    workdir = str(tmp_path)
    returncode, _, _, _ = _run_and_signal(workdir, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    killed_steps = len(_hashes(workdir))
    done = _run(workdir)
    assert "resumed from" in done.stderr
    resumed_from = int(done.stderr.split("resumed from ")[1].split("/")[-1].split()[0])
    assert EVERY <= resumed_from <= killed_steps and resumed_from % EVERY == 0
    _check_same_as_straight(workdir, straight)


def test_sigterm_saves_then_resume_is_bit_identical(tmp_path, straight):
    workdir = str(tmp_path)
    returncode, _, stderr, sent_at = _run_and_signal(workdir, signal.SIGTERM)
    assert returncode == 0, stderr[-3000:]
    assert "preempted" in stderr or "SIGTERM" in stderr
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    (preempted,) = [r["step"] for r in rows if "event/preempted" in r]
    assert sent_at <= preempted < STEPS
    assert preempted == len(_hashes(workdir))  # saved right after the last step it ran
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(preempted)))
    first_attempt = len(_hashes(workdir))
    done = _run(workdir)
    assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{preempted}" in done.stderr
    assert _hashes(workdir)[first_attempt]["step"] == preempted + 1
    _check_same_as_straight(workdir, straight)


def _ctrl_c_command(workdir, steps=STEPS):
    """The straight run's command with no periodic checkpoint: the one Ctrl-C writes is the only
    one (checkpoint and log intervals may change on resume; they change no result)."""
    return _command(workdir, steps) + ["--config.checkpoint.every_steps=1000",
                                       "--config.log.every_steps=1"]


def test_ctrl_c_saves_then_the_same_command_resumes_bit_identical(tmp_path, straight):
    from etils import epath

    from vlm_jax.train.checkpoint import is_complete
    from vlm_jax.train.loop import CTRL_C_MESSAGE
    workdir = str(tmp_path)
    returncode, stdout, stderr, _ = _run_and_signal(workdir, signal.SIGINT,
                                                    _ctrl_c_command(workdir), after=3)
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    assert stderr.count(CTRL_C_MESSAGE) == 1
    stopped = len(_hashes(workdir))
    assert 3 <= stopped < STEPS
    checkpoints = os.path.join(workdir, "checkpoints")
    assert (f"vlm-jax train: stopped by Ctrl-C at step {stopped}; checkpoint {checkpoints}/"
            f"{stopped}; re-run the same command to resume") in stderr
    assert os.listdir(checkpoints) == [str(stopped)]
    assert is_complete(epath.Path(checkpoints) / str(stopped))

    # With that one checkpoint damaged the re-run refuses in one line, never starts over.
    state_files = [os.path.join(root, name) for root, _, names
                   in os.walk(os.path.join(checkpoints, str(stopped), "state")) for name in names]
    largest = max(state_files, key=os.path.getsize)
    intact = open(largest, "rb").read()
    with open(largest, "r+b") as f:
        f.truncate(100)
    refused = subprocess.run(_ctrl_c_command(workdir), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-6000:]
    (line,) = [text for text in refused.stderr.splitlines()
               if text.startswith("vlm-jax train: error:")]
    assert f"workdir {workdir}: no checkpoint restores (step {stopped}: " in line
    assert len(_hashes(workdir)) == stopped  # no step ran
    with open(largest, "wb") as f:
        f.write(intact)

    done = subprocess.run(_ctrl_c_command(workdir), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {checkpoints}/{stopped}" in done.stderr
    assert [row["step"] for row in _hashes(workdir)] == list(range(1, STEPS + 1))  # each once
    _check_same_as_straight(workdir, straight)


def test_ctrl_c_in_one_process_of_two_stops_both_at_the_same_step(tmp_path):
    """With several processes SIGTERM belongs to JAX's preemption service, which stops every
    process at one step (a Python SIGTERM handler once hid it: the run went on to its end); a
    Ctrl-C in one process is passed on to it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    workdir = str(tmp_path)
    # A run far longer than the test (it is not resumed): Ctrl-C, not its end, must stop it.
    command = _ctrl_c_command(workdir, steps=200) + [
        "--config.mesh.data=1", "--config.mesh.fsdp=8", "--coordinator", coordinator,
        "--num-processes", "2"]
    env = dict(_env(), JAX_NUM_CPU_DEVICES="4", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen(command + ["--process-id", str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
    try:
        deadline = time.time() + 240
        while len(_hashes(workdir)) < 3:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # a peer that died leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.communicate()
    stopped = len(_hashes(workdir))
    assert stopped < 200 and os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    assert [p.returncode for p in procs] == [130, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"stopped by Ctrl-C at step {stopped}" in outputs[0]
    assert "Traceback" not in outputs[0] + outputs[1]
