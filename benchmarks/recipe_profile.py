"""Where the embedded default's time goes, per phase: the host data path alone, the train step
alone, and both as the training loop runs them; `--ops N` adds the N costliest XLA ops of the
step (jax.profiler trace; on CPU each op's wall time, two threads may overlap).

    python benchmarks/recipe_profile.py                         # all four phases, ~3 min
    python benchmarks/recipe_profile.py --phase instruct --ops 20
    python benchmarks/recipe_profile.py --phase lm --override train.micro_batches=1

Random init (the step's cost does not depend on the weights), the recipe's own config
(`configs/shapes/config.py`, `--override` as `--config.` takes it without the prefix) and its
tokenizer (fitted once into `--workdir`). Prints the CPU model and a same-run numpy matmul.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import cpu_model, numpy_matmul_gflops  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def top_ops(step, state, batch, count: int) -> list[tuple[str, float]]:
    """The `count` XLA ops with the most wall time per step (5 traced steps)."""
    import jax
    trace_dir = tempfile.mkdtemp(prefix="recipe_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(5):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not re.search(r"Thunk|Await|\$|\.py", e["name"]):
            total[e["name"]] += e.get("dur", 0) / 1e3 / 5
    return total.most_common(count)


def profile_phase(phase: str, workdir: str, overrides: list[str], steps: int, ops: int) -> dict:
    import jax
    from configs.shapes import run as recipe_run
    from vlm_jax import sharding
    from vlm_jax.data.pipeline import build_pipeline
    from vlm_jax.train.loop import batch_keys
    from vlm_jax.train.run_config import load_run_config
    from vlm_jax.train.step import (TrainStepConfig, create_train_state, make_train_step,
                                    plan_training)
    from vlm_jax.train.tokenizer import build_tokenizer

    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        recipe_run.fit_tokenizer(workdir)
    run = load_run_config(f"{recipe_run.CONFIG_FILE}:phase={phase},tokenizer={tokenizer_dir}",
                          overrides, jax.device_count())
    data = build_pipeline(run.data, build_tokenizer(run, workdir))
    first = next(data)
    data_s = statistics.mean(_timed(lambda: next(data)) for _ in range(steps))

    mesh = sharding.make_mesh(run.mesh)
    plan = plan_training(run.model, TrainStepConfig.from_train(run.train), mesh)
    state = create_train_state(plan, jax.random.key(0))
    step = make_train_step(plan)
    keys = batch_keys(run.train.phase.name)
    batch = sharding.global_batch({k: first[k] for k in keys}, mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps

    start = time.perf_counter()
    for _ in range(steps):  # as the loop runs: next batch, step, wait for its loss
        local = next(data)
        state, metrics = step(state, sharding.global_batch({k: local[k] for k in keys}, mesh))
        float(metrics["loss"])
    loop_s = (time.perf_counter() - start) / steps
    result = {"phase": phase, "batch": run.data.batch_size, "micro_batches": run.train.micro_batches,
              "loss_chunk_size": run.train.loss_chunk_size, "seq_len": run.data.seq_len,
              "data_ms": 1e3 * data_s, "step_ms": 1e3 * step_s, "loop_ms": 1e3 * loop_s,
              "compile_s": compile_s, "steps": run.train.steps,
              "loop_s_per_phase": loop_s * run.train.steps}
    if ops:
        result["top_ops_ms"] = top_ops(step, state, batch, ops)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", action="append", choices=("contrastive", "lm", "align", "instruct"))
    parser.add_argument("--override", action="append", default=[],
                        help="a config override, e.g. train.micro_batches=1 (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps / batches per measure")
    parser.add_argument("--ops", type=int, default=0, help="print the N costliest XLA ops")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recipe_profile"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; numpy 4096^2 f32 matmul "
          f"{numpy_matmul_gflops():.0f} GFLOP/s", flush=True)
    results = []
    for phase in args.phase or ("contrastive", "lm", "align", "instruct"):
        r = profile_phase(phase, args.workdir, args.override, args.steps, args.ops)
        results.append(r)
        print(f"{phase:12s} batch {r['batch']:3d} x {r['micro_batches']} micro, chunk "
              f"{r['loss_chunk_size']:3d}, seq {r['seq_len']:3d}: data {r['data_ms']:6.1f} ms/batch, "
              f"step {r['step_ms']:6.1f} ms, loop {r['loop_ms']:6.1f} ms "
              f"(x {r['steps']} steps = {r['loop_s_per_phase']:.0f} s), compile {r['compile_s']:.1f} s",
              flush=True)
        for name, ms in r.get("top_ops_ms", []):
            print(f"    {ms:8.2f} ms  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
