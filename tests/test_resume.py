"""Exact resume across processes (`python -m vlm_jax.cli train` in a subprocess): 2N steps straight
== N steps, SIGKILL, resume to 2N (final params and every step's batch bit-identical); the same
with SIGTERM, which saves at the next step boundary and exits cleanly, the resumed run starting
right after that step."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vlm_jax import model_dir

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 40
SIGNAL_AFTER = 12  # steps done before the signal is sent


def _command(workdir):
    return [sys.executable, "-m", "vlm_jax.cli", "train", "--config",
            os.path.join(ROOT, "configs", "tiny.py") + f":steps={STEPS}", "--workdir", workdir,
            "--config.checkpoint.every_steps=5", "--config.log.batch_hash=true",
            "--config.log.progress_bar=false", "--config.log.tensorboard=false",
            "--config.eval_data=None"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
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


def _run_and_signal(workdir, signum):
    """Start a run, send `signum` once SIGNAL_AFTER steps are done; (returncode, stderr,
    steps done when the signal was sent)."""
    process = subprocess.Popen(_command(workdir), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_hashes(workdir)) < SIGNAL_AFTER:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    sent_at = SIGNAL_AFTER
    assert len(_hashes(workdir)) < STEPS, "the run finished before the signal landed"
    return process.returncode, stderr, sent_at


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
    returncode, _, _ = _run_and_signal(workdir, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    killed_steps = len(_hashes(workdir))
    done = _run(workdir)
    assert "resumed from" in done.stderr
    resumed_from = int(done.stderr.split("resumed from ")[1].split("/")[-1].split()[0])
    assert 5 <= resumed_from <= killed_steps and resumed_from % 5 == 0
    _check_same_as_straight(workdir, straight)


def test_sigterm_saves_then_resume_is_bit_identical(tmp_path, straight):
    workdir = str(tmp_path)
    returncode, stderr, sent_at = _run_and_signal(workdir, signal.SIGTERM)
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
