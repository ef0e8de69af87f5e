"""The training loop in-process on the 8-device fake mesh: JSONL and TensorBoard logs hold the
metrics (event files decoded with protobuf's own parser), the final model directory, the
non-finite stop naming the step, and the too-many-skipped stop."""
import json
import os
import re
import struct
import time

import jax
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from vlm_jax import model_dir
from vlm_jax.train import run_config as config_lib
from vlm_jax.train import event_file
from vlm_jax.errors import TrainingStopped
from vlm_jax.train import tokenizer as run_tokenizer
from vlm_jax.train.loop import train

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def _config(overrides=(), arg="steps=4"):
    config = config_lib.load_config_file(f"{TINY}:{arg}")
    return config_lib.apply_overrides(config, ["log.progress_bar=false", *overrides])


def _event_class():
    """tensorflow's Event / Summary protos (the fields we write), declared independently here."""
    proto = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="t",
                                               syntax="proto3")
    f = descriptor_pb2.FieldDescriptorProto
    value = proto.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=f.TYPE_FLOAT, label=f.LABEL_OPTIONAL)
    summary = proto.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=f.TYPE_MESSAGE, type_name=".t.Value",
                      label=f.LABEL_REPEATED)
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=f.TYPE_MESSAGE, type_name=".t.Summary",
                    label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def _read_records(path):
    data = open(path, "rb").read()
    records, offset = [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert header_crc == event_file.masked_crc32c(header)
        record = data[offset + 12:offset + 12 + length]
        (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert record_crc == event_file.masked_crc32c(record)
        records.append(record)
        offset += 16 + length
    return records


def test_crc32c_matches_the_castagnoli_check_value():
    assert event_file.crc32c(b"123456789") == 0xE3069283  # the CRC-32C standard check value
    assert event_file.crc32c(b"") == 0


class _StepClock:
    """The loop's `time` module with a fake `perf_counter`: a clock that moves by exactly 1 s
    each time a train step computes (`tick`) and stands still otherwise, so a logged
    step_time_s counts the steps its interval spans."""

    def __init__(self):
        self.now = 0.0
        self.ticks = 0

    def perf_counter(self):
        return self.now

    def tick(self):
        self.now += 1.0
        self.ticks += 1

    def __getattr__(self, name):
        return getattr(time, name)


def _step_times(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step_time_s"] for r in rows if "loss" in r]


def test_step_time_is_one_step_not_two(tmp_path, monkeypatch):
    # The loop reads step k's metrics after dispatching step k+1; step k's clock must start
    # when step k-1 finished (a bug once started it one step earlier: every time doubled).
    from vlm_jax.train import loop

    make_train_step = loop.make_train_step
    clock = _StepClock()

    def ticking(plan):  # the clock ticks when a step's metrics are computed, after dispatch
        step = make_train_step(plan)

        def tick(loss):
            clock.tick()
            return loss

        @jax.jit
        def compute(metrics):
            loss = jax.pure_callback(tick, jax.ShapeDtypeStruct((), metrics["loss"].dtype),
                                     metrics["loss"])
            return {**metrics, "loss": loss}

        def run(state, batch):
            state, metrics = step(state, batch)
            return state, compute(metrics)
        return run

    monkeypatch.setattr(loop, "make_train_step", ticking)
    monkeypatch.setattr(loop, "time", clock)
    train(_config(["log.every_steps=1", "eval_data=None"]), str(tmp_path / "run"))
    assert clock.ticks == 4  # one computation per step
    assert _step_times(tmp_path / "run") == [1.0] * 4  # 2.0: a clock started a step early


def test_logs_hold_the_metrics_and_the_model_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    metrics = train(_config(["log.every_steps=2", "log.peak_flops_per_device=1e9"]), workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for row in train_rows:
        for key in ("loss", "lr", "grad_norm", "token_accuracy", "step_time_s", "examples_per_s",
                    "tokens_per_s", "mfu", "data/seen"):
            assert key in row and row[key] == row[key], key  # present and not NaN
        assert 0 < row["mfu"] and row["data/seen"] >= 8
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 4 and eval_rows[0]["eval/count"] > 0
    assert metrics["step"] == 4 and metrics["loss"] == train_rows[-1]["loss"]

    event_dir = os.path.join(workdir, "tensorboard")
    (name,) = os.listdir(event_dir)
    event_class = _event_class()
    events = [event_class.FromString(r) for r in _read_records(os.path.join(event_dir, name))]
    assert events[0].file_version == "brain.Event:2"
    scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
    for row in train_rows:
        assert scalars[(row["step"], "train/loss")] == pytest.approx(row["loss"], rel=1e-6)
        assert scalars[(row["step"], "train/lr")] == pytest.approx(row["lr"], rel=1e-6)
        assert scalars[(row["step"], "data/seen")] == row["data/seen"]
    assert scalars[(4, "eval/loss")] == pytest.approx(eval_rows[0]["eval/loss"], rel=1e-6)

    assert model_dir.load_config(os.path.join(workdir, "model")).llm.vocab_size == 2048
    assert os.path.isdir(os.path.join(workdir, "model", "tokenizer"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


def test_non_finite_loss_stops_naming_the_step_and_checkpoint(tmp_path):
    # A huge lr blows the params up after the first update; step 2 is then not finite.
    config = _config(["train.optimizer.learning_rate=1e30", "train.optimizer.warmup_steps=0",
                      "checkpoint.every_steps=1", "train.steps=6"])
    with pytest.raises(TrainingStopped, match=r"step (\d+): loss .* is not finite.*Last good "
                                              r"checkpoint: .*checkpoints/(\d+)") as info:
        train(config, str(tmp_path))
    bad, good = map(int, re.search(r"step (\d+):.*checkpoints/(\d+)", str(info.value)).groups())
    assert good == bad - 1 and not os.path.exists(tmp_path / "model")


def test_too_many_skipped_examples_stops_with_the_counts(tmp_path):
    # One image (16 tokens) + the question and answer never fit 20 tokens.
    config = _config(["data.seq_len=20", "data.min_seen_for_skip_check=8"])
    with pytest.raises(TrainingStopped, match=r"step 1: skipped \d+ of \d+ examples .*too_long"):
        train(config, str(tmp_path))


def test_last_step_time_is_a_real_step_when_the_backend_runs_steps_at_dispatch(tmp_path,
                                                                                monkeypatch):
    # A backend that computes inside the train_step call (as XLA:CPU may): the step's clock must
    # start before the call, or the last step (finished right away) logs ~0 s and huge ex/s.
    from vlm_jax.train import loop

    make_train_step = loop.make_train_step
    clock = _StepClock()

    def synchronous(plan):  # the clock ticks inside the train_step call, once it computed
        step = make_train_step(plan)

        def run(state, batch):
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            clock.tick()
            return state, metrics
        return run

    monkeypatch.setattr(loop, "make_train_step", synchronous)
    monkeypatch.setattr(loop, "time", clock)
    train(_config(["log.every_steps=1", "eval_data=None"]), str(tmp_path / "run"))
    assert _step_times(tmp_path / "run") == [1.0] * 4  # 0 s: a clock started after the call


def test_one_epoch_of_a_packed_run_trains_every_example_once(tmp_path):
    # 40 examples, several per packed row: the run ends with the data, its lr schedule counts
    # examples and spans exactly the 40, and every example is trained on once.
    config = _config(["log.every_steps=1"], arg="phase=instruct,steps=4,seq_len=128")
    config.data.sources[0]["options"]["num_examples"] = 40
    config.train.steps = None
    config.train.epochs = 1
    del config.train.optimizer["warmup_steps"]
    config.train.optimizer.warmup_ratio = 0.25
    metrics = train(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    per_step = [r["num_examples"] for r in train_rows]
    assert sum(per_step) == 40 and max(per_step) > 8  # packed: more examples than the 8 rows
    assert [r["examples_seen"] for r in train_rows] == list(np.cumsum(per_step))
    assert train_rows[-1]["epoch"] == 1.0 and train_rows[-1]["data/seen"] == 40
    assert metrics["step"] == len(train_rows)
    # lr(examples seen before the step): warmup over 10 examples, then cosine to 0 at 40
    import optax
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, 3e-3, 10), optax.cosine_decay_schedule(3e-3, 30)], [10])
    seen_before = [0.0] + [r["examples_seen"] for r in train_rows[:-1]]
    np.testing.assert_allclose([r["lr"] for r in train_rows],
                               [float(schedule(s)) for s in seen_before], rtol=1e-5)


def test_first_ctrl_c_asks_to_stop_a_second_interrupts(capsys):
    import signal

    from vlm_jax.train import loop
    previous = signal.getsignal(signal.SIGINT)
    with loop._Preemption() as preemption:
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested and preemption.reason == "Ctrl-C"
        assert capsys.readouterr().err.strip() == loop.CTRL_C_MESSAGE
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
    with loop._Preemption() as preemption:
        signal.raise_signal(signal.SIGTERM)
        assert preemption.requested and preemption.reason == "SIGTERM"


def test_cli_train_exit_codes_and_lines(tmp_path, monkeypatch, capsys):
    from vlm_jax import cli
    from vlm_jax.train import loop
    argv = ["train", "--config", f"{TINY}:steps=4", "--workdir", str(tmp_path)]
    calls = []

    def fake_train(outcome):
        def run(config, workdir, allow_schedule_change=False):
            calls.append(allow_schedule_change)
            if outcome == "interrupt":
                raise KeyboardInterrupt
            return {"step": 3, "preempted": True, "stopped_by": outcome,
                    "checkpoint": f"{workdir}/checkpoints/3"}
        return run

    monkeypatch.setattr(loop, "train", fake_train("interrupt"))
    assert cli.main(argv) == 130  # a second Ctrl-C
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted by Ctrl-C" in err and str(tmp_path) in err
    monkeypatch.setattr(loop, "train", fake_train("Ctrl-C"))
    assert cli.main(argv + ["--allow-schedule-change"]) == 130  # saved, then stopped
    err = capsys.readouterr().err
    assert err == (f"vlm-jax train: stopped by Ctrl-C at step 3; checkpoint {tmp_path}/"
                   f"checkpoints/3; re-run the same command to resume\n")
    monkeypatch.setattr(loop, "train", fake_train("SIGTERM"))
    assert cli.main(argv) == 0  # preemption: the launcher restarts it
    assert "vlm-jax train: preempted" in capsys.readouterr().out
    assert calls == [False, True, False]


def test_align_without_init_from_warns_once_naming_the_random_towers(tiny_trained_run, tmp_path,
                                                                      caplog):
    # tiny_trained_run (conftest) is configs/tiny.py phase=align without init_from.
    (line,) = [m for m in tiny_trained_run.warnings if "randomly initialised" in m]
    assert "train.phase=align" in line and "vision tower" in line and "LLM" in line
    with caplog.at_level("WARNING"):  # started from that model: nothing to say
        train(_config(["eval_data=None", f"train.init_from.path={tiny_trained_run.workdir}"],
                      arg="phase=instruct,steps=2"), str(tmp_path / "instruct"))
    assert not [r for r in caplog.records if "randomly initialised" in r.getMessage()]


def test_unknown_flops_log_mfu_null_and_warn_once(tmp_path, monkeypatch, caplog):
    # Every shipped projector has a FLOP formula: drop the tiny config's one to get a type
    # that has none. A known peak used to turn that into an exception at the first log row.
    from vlm_jax.train import flops
    monkeypatch.delitem(flops.PROJECTOR_FLOP_FORMULAS, "mlp2x_gelu")
    workdir = str(tmp_path / "run")
    with caplog.at_level("WARNING"):
        metrics = train(_config(["eval_data=None", "log.every_steps=1",
                                 "log.peak_flops_per_device=1e9"], arg="steps=2"), workdir)
    lines = [r.getMessage() for r in caplog.records if "FLOP formula" in r.getMessage()]
    assert len(lines) == 1 and "model.projector.type='mlp2x_gelu'" in lines[0], lines
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        assert "mfu" in row and row["mfu"] is None and row["step_time_s"] > 0
    assert "mfu" in metrics and metrics["mfu"] is None and metrics["step"] == 2


@pytest.mark.parametrize("arg, overrides", [("phase=instruct,batch=16", ["train.micro_batches=2"]),
                                            ("phase=contrastive", [])])
def test_eval_loss_is_the_train_step_loss_on_the_same_batch(tmp_path, arg, overrides):
    from vlm_jax import sharding
    from vlm_jax.data.pipeline import build_pipeline
    from vlm_jax.train import loop
    from vlm_jax.train.step import (TrainStepConfig, create_train_state, make_train_step,
                                    plan_training)
    run = config_lib.build_run_config(_config(overrides, arg=f"{arg},steps=2"),
                                      jax.device_count(), jax.process_count())
    tokenizer = run_tokenizer.build_tokenizer(run, str(tmp_path))
    local = next(iter(build_pipeline(run.data, tokenizer)))
    mesh = sharding.make_mesh(run.mesh)
    plan = plan_training(run.model, TrainStepConfig(
        phase=run.train.phase, optimizer=run.train.optimizer,
        micro_batches=run.train.micro_batches), mesh)
    batch = sharding.global_batch({k: local[k] for k in loop.batch_keys(run.train.phase.name)},
                                  mesh)
    state = create_train_state(plan, jax.random.key(0))
    sums = {k: float(v) for k, v in jax.device_get(
        loop._make_eval_step(plan)(plan.model_params(state), batch)).items()}
    _, metrics = make_train_step(plan)(state, batch)  # the loss is taken before the update
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert sums["count"] > 0
    assert sums["loss_sum"] / sums["count"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-6)
    if "correct" in sums:
        assert sums["count"] == metrics["num_loss_tokens"]
        assert sums["correct"] / sums["count"] == pytest.approx(metrics["token_accuracy"],
                                                                rel=1e-5, abs=1e-6)


def test_a_prefix_lm_run_records_it_in_its_model_directory(tmp_path):
    """Why / a model trained with bidirectional prompts (data.prefix_lm) was decoded causally by
    generate / score and exported as a causal model: the model directory now records it, and
    everything downstream reads it from there (api.load, generate, score, eval, export-hf)."""
    train(_config(["data.prefix_lm=True", "train.steps=2", "checkpoint.every_steps=2"]),
          str(tmp_path))
    assert model_dir.load_data_settings(str(tmp_path / "model"))["prefix_lm"] is True
