"""Training-step throughput against the PyTorch peer (HF LLaVA), side by side on one machine.

    python benchmarks/train_throughput.py --out /tmp/train_throughput.json

Runs, in one process sequence (interleaved `--rounds` times, so a busy neighbour slows all alike):
  * a large f32 matmul (numpy) -> this machine's GFLOP/s yardstick;
  * our train step on the bench config (default ../shared/bench/bench_s.json: SigLIP 6x384 ->
    mlp2x_gelu -> Llama 8x576, batch 8 x (196 image + 128 text) tokens, phase instruct with the
    vision tower frozen, AdamW lr 2e-5, f32), in a subprocess so its peak RSS is its own;
  * the peer `peer_hf_llava.py --mode train` eager and `--compile`, as subprocesses.
Prints step times (medians over timed steps), speed ratios, achieved GFLOP/s as a fraction of the
matmul, peak RSS and contention (load average, the fraction of CPU other processes used while a
step ran), and writes everything to `--out`.

Both sides are credited with the same model FLOPs (the peer's convention, `vlm_jax.train.flops`),
so the GFLOP/s ratio equals the speed ratio. Our step executes fewer FLOPs than that count: it
skips the vision layer after `feature_layer` and computes logits only at loss positions;
`executed_flops` reports what it runs.

Our step splits the batch in 2 micro-batches (`--micro-batches`, train.micro_batches: the same
gradient, accumulated): each half's activations stay in the CPU's caches (8 x 324 tokens x
1536 f32 of MLP activations is 16 MB a layer, 2 MB of L2 and 32 MB of shared L3 here). Measured
beside 1 micro-batch on an AMD EPYC 2-core: 5.12 vs 6.00 s a step, peak RSS 2052 vs 2352 MiB
(4 micro-batches: 5.55 s). It runs with remat policy `dots_no_batch` (`--remat`): the backward recomputes norms,
RoPE, activations and attention from the saved weight-matmul outputs (saved since stop 24; before,
the policy kept no more than `full`, see benchmarks/README.md). On CPU that is faster than
keeping everything: XLA:CPU allocates each step's temporaries as one block, which glibc maps
fresh from the kernel every step (one page fault per 4 KiB: 2.5 GB -> 625k faults with `none`),
and it halves peak memory. `--allocator tuned` keeps freed memory mapped instead (see
ALLOCATOR_ENV): fewer faults, but the heap fragments and peak RSS grows; not the default.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "..", "shared", "bench", "bench_s.json")
CLEAN_FRAC = 0.05  # the peer's threshold: a step is "clean" if others used < 5% of the cores
# One arena, no mmap for big blocks, never trim: freed temporaries stay mapped and are reused.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                 "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": str(1 << 28)}


def log(*parts):
    print(*parts, flush=True)


class ForeignLoad:
    """CPU seconds used by other processes during a window, as a fraction of the machine."""

    def __init__(self):
        import psutil
        self.psutil, self.proc, self.ncpu = psutil, psutil.Process(), psutil.cpu_count()

    def _busy(self):
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + \
            getattr(t, "steal", 0)

    def _own(self):
        t = self.proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def stop(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        return foreign / (wall * self.ncpu)


# ----------------------------------------------------------------------------- our worker

def bench_model_config(bench: dict, dtype: str, remat_policy: str = "none"):
    """The bench JSON's model as our VLMConfig (the peer's mapping, see peer_hf_llava.py)."""
    from vlm_jax.models.decoder import decoder_config
    from vlm_jax.models.projector import ProjectorConfig
    from vlm_jax.models.siglip import VisionConfig
    from vlm_jax.models.vlm import VLMConfig
    v, t = bench["vision"], bench["text"]
    if bench["projector"]["type"] != "mlp2x_gelu" or v["act"] != "gelu_pytorch_tanh":
        raise ValueError(f"bench config {bench.get('name')}: only the mlp2x_gelu projector and a "
                         f"gelu_pytorch_tanh SigLIP are mapped")
    vision = VisionConfig(image_size=bench["image_size"], patch_size=v["patch_size"],
                          width=v["hidden_size"], depth=v["num_layers"], num_heads=v["num_heads"],
                          mlp_dim=v["mlp_dim"], layer_norm_eps=v["layer_norm_eps"],
                          feature_layer=v["feature_layer"], use_head=False)
    llm = decoder_config("llama", vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                         num_layers=t["num_layers"], num_heads=t["num_heads"],
                         num_kv_heads=t["num_kv_heads"], head_dim=t["head_dim"],
                         mlp_dim=t["mlp_dim"], norm_eps=t["rms_norm_eps"],
                         rope_theta=t["rope_theta"], tie_embeddings=t["tie_word_embeddings"])
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", act="gelu"), llm=llm,
                     image_token_id=t["vocab_size"] - 1, vision_feature_select="full", dtype=dtype,
                     remat_policy=remat_policy)


def bench_batch(bench: dict, image_token_id: int, seed: int = 0) -> dict:
    """The peer's batch in our layout: image tokens first, then text; loss on every text token
    (the peer's labels shifted by one: position p predicts token p + 1)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    batch_size, image_tokens, text_len = bench["batch_size"], bench["num_image_tokens"], bench["text_len"]
    seq = image_tokens + text_len
    text = rng.integers(0, image_token_id, (batch_size, text_len))
    input_ids = np.concatenate([np.full((batch_size, image_tokens), image_token_id), text], 1)
    target_ids = np.concatenate([input_ids[:, 1:], np.zeros((batch_size, 1), np.int64)], 1)
    loss_mask = np.zeros((batch_size, seq), np.float32)
    loss_mask[:, image_tokens - 1:seq - 1] = 1.0
    size = bench["image_size"]
    return {"input_ids": input_ids.astype(np.int32), "target_ids": target_ids.astype(np.int32),
            "loss_mask": loss_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch_size, seq)).copy(),
            "mask_ar": np.ones((batch_size, seq), np.int32),
            "images": rng.standard_normal((batch_size, 1, size, size, 3)).astype(np.float32)}


def run_ours(bench: dict, dtype: str, remat_policy: str, warmup: int, steps: int,
             micro_batches: int = 1) -> dict:
    import jax
    from vlm_jax import sharding
    from vlm_jax.train import flops
    from vlm_jax.train.optimizer import OptimizerConfig
    from vlm_jax.train.phases import PhaseConfig
    from vlm_jax.train.step import TrainStepConfig, create_train_state, make_train_step, plan_training

    model_config = bench_model_config(bench, dtype, remat_policy)
    opt = bench["optimizer"]
    # torch.optim.AdamW as the peer runs it: constant lr, no clipping.
    optimizer = OptimizerConfig(learning_rate=opt["lr"], weight_decay=opt["weight_decay"],
                                schedule="constant", grad_clip_norm=None)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    start = time.perf_counter()
    plan = plan_training(model_config, TrainStepConfig(PhaseConfig(bench["phase"]), optimizer,
                                                       micro_batches=micro_batches), mesh)
    state = create_train_state(plan, jax.random.key(0))
    train_step = make_train_step(plan)
    batch = sharding.global_batch(bench_batch(bench, model_config.image_token_id), mesh)
    build_s = time.perf_counter() - start

    warm_times, times, foreign, losses = [], [], [], []
    for i in range(warmup + steps):
        load = ForeignLoad().start()
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        elapsed = time.perf_counter() - start
        frac = load.stop()
        if i < warmup:
            warm_times.append(elapsed)
            log(f"[ours] warmup {i}: {elapsed:.3f}s loss={loss:.4f}")
        else:
            times.append(elapsed)
            foreign.append(frac)
            losses.append(loss)
            log(f"[ours] step {i - warmup}: {elapsed:.3f}s loss={loss:.4f} foreign_cpu_frac={frac:.3f}")

    batch_size, seq = bench["batch_size"], bench["num_image_tokens"] + bench["text_len"]
    model_flops = flops.train_step_flops(model_config, plan.config.phase, batch_size, seq)
    executed = flops.train_step_flops(model_config, plan.config.phase, batch_size, seq,
                                      vision_layers=model_config.vision.feature_depth,
                                      lm_head_positions=bench["text_len"])
    matmul = flops.measure_matmul_flops(size=2048)
    med = statistics.median(times)
    clean = [t for t, f in zip(times, foreign) if f < CLEAN_FRAC]
    return {"dtype": dtype, "remat_policy": remat_policy, "micro_batches": micro_batches,
            "build_s": build_s, "warmup_step_s": warm_times, "step_s": times,
            "median_step_s": med, "step_foreign_cpu_frac": foreign,
            "n_clean_steps": len(clean),
            "clean_median_step_s": statistics.median(clean) if clean else None,
            "losses": losses, "flops": model_flops.as_dict(), "executed_flops": executed.as_dict(),
            "achieved_gflops_per_s": model_flops.total / med / 1e9,
            "executed_gflops_per_s": executed.total / med / 1e9,
            "jax_matmul_gflops_per_s": matmul / 1e9,
            "mfu_vs_jax_matmul": flops.mfu(model_flops.total, med, matmul),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "jax": jax.__version__, "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
            "xla_flags": os.environ.get("XLA_FLAGS")}


# ----------------------------------------------------------------------------- orchestration

NUMPY_MATMUL = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal(({n}, {n}), dtype=np.float32)
b = np.random.default_rng(1).standard_normal(({n}, {n}), dtype=np.float32)
a @ b
best = float("inf")
for _ in range({repeats}):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
print(2 * {n} ** 3 / best / 1e9)
"""


def cpu_model() -> str:
    """lscpu's model name (speed figures are quoted next to it: the same machine kind comes
    as an Intel with AMX and as an AMD EPYC)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown")


def numpy_matmul_gflops(size: int = 4096, repeats: int = 3, native: bool = True) -> float:
    """Best GFLOP/s of a size^3 f32 numpy matmul, in a fresh process (OpenBLAS threads that
    spin after a call would otherwise steal CPU from the contenders). `native` drops
    OPENBLAS_CORETYPE: this environment pins it to Haswell (AVX2 kernels, ~290 GFLOP/s on a
    quiet machine) while the CPU has AVX-512."""
    env = {k: v for k, v in os.environ.items() if not (native and k == "OPENBLAS_CORETYPE")}
    code = NUMPY_MATMUL.format(n=size, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def _progress_line(line: str) -> bool:
    return line.startswith("[") and ("step" in line or "warmup" in line)


def run_subprocess(cmd: list[str], env: dict, json_out: str, label: str,
                   echo=_progress_line) -> dict:
    """Run one side of the comparison; echo its stdout lines that `echo` picks; -> its JSON."""
    log(f"[{label}] {' '.join(cmd)}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if echo(line):
            log(f"    {line}")
    with open(json_out) as f:
        result = json.load(f)
    result["wall_s_total"] = time.perf_counter() - start
    return result


def summarize(name: str, median_s: float, flops_per_step: float, matmul_gflops: float,
              rss_mib: float, foreign: list[float]) -> dict:
    gflops = flops_per_step / median_s / 1e9
    return {"name": name, "median_step_s": median_s, "achieved_gflops_per_s": gflops,
            "fraction_of_matmul": gflops / matmul_gflops, "peak_rss_mib": rss_mib,
            "max_foreign_cpu_frac": max(foreign) if foreign else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--peer", default=None, help="peer script (default: next to --config)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "train_throughput.json"))
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats of the sequence")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="our compute dtype (the peer is f32 only; report bf16 separately)")
    ap.add_argument("--skip-compiled", action="store_true", help="skip the peer's torch.compile run")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--remat", default="dots_no_batch", help="our model's remat policy")
    ap.add_argument("--micro-batches", type=int, default=2,
                    help="our step's micro-batches (train.micro_batches; see the docstring)")
    ap.add_argument("--allocator", default="default", choices=["tuned", "default"])
    ap.add_argument("--peer-allocator", default="default", choices=["tuned", "default"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    with open(args.config) as f:
        bench = json.load(f)
    timing = bench["timing"]

    if args.worker:
        result = run_ours(bench, args.dtype, args.remat, timing["warmup_steps"],
                          timing["timed_steps"], args.micro_batches)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        return

    peer_script = args.peer or os.path.join(os.path.dirname(os.path.abspath(args.config)),
                                            "peer_hf_llava.py")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tuned_env = {**base_env, **ALLOCATOR_ENV}
    work = tempfile.mkdtemp(prefix="train_throughput_")
    rounds = []
    for r in range(args.rounds):
        entry = {"loadavg_start": os.getloadavg(), "numpy_matmul_gflops": numpy_matmul_gflops(),
                 "numpy_matmul_gflops_env_coretype": numpy_matmul_gflops(native=False)}
        log(f"[round {r}] numpy f32 matmul: {entry['numpy_matmul_gflops']:.1f} GFLOP/s "
            f"(AVX-512 kernels), {entry['numpy_matmul_gflops_env_coretype']:.1f} GFLOP/s with "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}; load average "
            f"{entry['loadavg_start']}")
        ours_out = os.path.join(work, f"ours_{r}.json")
        entry["ours"] = run_subprocess(
            [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config,
             "--dtype", args.dtype, "--remat", args.remat,
             "--micro-batches", str(args.micro_batches), "--json-out", ours_out],
            tuned_env if args.allocator == "tuned" else base_env, ours_out, "ours")
        peer_env = tuned_env if args.peer_allocator == "tuned" else base_env
        peer_modes = [] if args.skip_peer else (["eager"] if args.skip_compiled else ["eager", "compiled"])
        for mode in peer_modes:
            out = os.path.join(work, f"peer_{mode}_{r}.json")
            cmd = [sys.executable, peer_script, "--config", args.config, "--mode", "train",
                   "--json-out", out] + (["--compile"] if mode == "compiled" else [])
            entry[f"peer_{mode}"] = run_subprocess(cmd, peer_env, out, f"peer {mode}")
        entry["loadavg_end"] = os.getloadavg()
        rounds.append(entry)

    report = build_report(rounds, args, bench)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {args.out}")


def build_report(rounds: list[dict], args, bench: dict) -> dict:
    """Medians over rounds of each contender's median step, ratios, and the printed table."""
    flops_per_step = rounds[0]["ours"]["flops"]["total"]
    matmul = statistics.median(r["numpy_matmul_gflops"] for r in rounds)
    rows = {}
    ours_med = statistics.median(r["ours"]["median_step_s"] for r in rounds)
    rows["ours"] = summarize(f"ours (JAX, {args.dtype}, {args.remat}, "
                             f"{args.micro_batches} micro-batches)", ours_med, flops_per_step, matmul,
                             max(r["ours"]["peak_rss_mib"] for r in rounds),
                             [f for r in rounds for f in r["ours"]["step_foreign_cpu_frac"]])
    for mode in ("eager", "compiled"):
        key = f"peer_{mode}"
        if key not in rounds[0]:
            continue
        peer_flops = rounds[0][key]["train"]["flops"]["flops_per_step"]
        if peer_flops != flops_per_step:
            raise RuntimeError(f"FLOP counts differ: ours {flops_per_step} vs peer {peer_flops}")
        med = statistics.median(r[key]["train"]["median_step_s"] for r in rounds)
        rows[key] = summarize(f"peer HF LLaVA ({mode})", med, flops_per_step, matmul,
                              max(r[key]["peak_rss_mib"] for r in rounds),
                              [f for r in rounds for f in r[key]["train"]["step_foreign_cpu_frac"]])
        rows[key]["speedup_ours_vs_this"] = med / ours_med
        # Within-round ratios: each round's contenders ran back to back under similar load.
        rows[key]["per_round_speedup"] = [r[key]["train"]["median_step_s"] / r["ours"]["median_step_s"]
                                          for r in rounds]

    log(f"\nbench {bench.get('name')}: batch {bench['batch_size']} x "
        f"({bench['num_image_tokens']} image + {bench['text_len']} text) tokens, phase "
        f"{bench['phase']}, {flops_per_step / 1e9:.1f} GFLOP/step (model FLOPs, peer convention); "
        f"numpy f32 matmul {matmul:.1f} GFLOP/s on {cpu_model()}")
    log(f"{'':28s} {'step s':>8s} {'GFLOP/s':>8s} {'of matmul':>9s} {'peak RSS':>9s} "
        f"{'speedup':>8s} {'foreign':>8s}")
    for key, row in rows.items():
        speed = row.get("speedup_ours_vs_this")
        log(f"{row['name']:28s} {row['median_step_s']:8.3f} {row['achieved_gflops_per_s']:8.1f} "
            f"{row['fraction_of_matmul']:9.2f} {row['peak_rss_mib'] / 1024:7.2f}GB "
            f"{'' if speed is None else f'{speed:7.2f}x':>8s} {row['max_foreign_cpu_frac']:8.3f}")
    return {"config": os.path.abspath(args.config), "bench": bench, "settings": vars(args),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "flops_per_step": flops_per_step,
            "ours_executed_flops_per_step": rounds[0]["ours"]["executed_flops"]["total"],
            "numpy_matmul_gflops": matmul,
            "numpy_matmul_gflops_env_coretype": statistics.median(
                r["numpy_matmul_gflops_env_coretype"] for r in rounds),
            "table": rows, "rounds": rounds}


if __name__ == "__main__":
    main()
