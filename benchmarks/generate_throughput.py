"""Generation speed against the PyTorch peer (HF LLaVA `generate`), side by side on one machine.

    python benchmarks/generate_throughput.py --out /tmp/generate_throughput.json

For each batch size (default 1 and 8) it runs, one after the other:
  * our KV-cache `vlm_jax.inference.generate` (f32, greedy, no stop: exactly `new_tokens` tokens) on the
    bench config's model (default ../shared/bench/bench_s.json: SigLIP 6x384 -> mlp2x_gelu ->
    Llama 8x576, prompt = 196 image tokens + 32 text tokens, 32 new tokens), in a subprocess;
  * the peer `peer_hf_llava.py --mode generate` on a copy of the JSON with generate.batch_size
    set, in a subprocess.

Measured the same way on both sides:
  time to first token  the whole call for one new token (image encode + prefill + first token),
                       median over reps;
  decode step          (T(N) - T(1)) / (N - 1) with T(n) the median time of a call for n new
                       tokens (the peer reports this too; its median streamer interval is shown
                       alongside); decode tokens/s = batch / decode step.
Bound: bytes one decode step must read (every LLM weight once: the layer matrices and norms plus
the tied LM head; and the KV cache of the real context, averaged over the steps) divided by a
large-array copy rate measured in the same worker (numpy copy of 512 MiB, bytes copied per
second: the convention of ENVIRONMENT.md's 16.6 GB/s). Our fraction = bound step / our step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "..", "shared", "bench", "bench_s.json")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # noqa: E402
from train_throughput import ForeignLoad, bench_model_config, log  # noqa: E402


def copy_rate_gb_s(size_mib: int = 512, repeats: int = 5) -> float:
    """Best numpy copy rate of a large f32 array, in bytes copied per second / 1e9."""
    source = np.ones(size_mib * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return source.nbytes / best / 1e9


def decode_bytes_per_step(model_config, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes a decode step must read: LLM weights once (the input embedding row aside) and the
    KV cache of the context, averaged over the decode steps."""
    import jax

    from vlm_jax.models.vlm import init_params
    shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))["llm"]
    itemsize = 4  # f32
    weights = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) * itemsize
    llm = model_config.llm
    mean_context = prompt_len + (new_tokens - 1) / 2  # context seen by steps 1 .. N-1
    kv = 2 * llm.num_layers * batch * mean_context * llm.num_kv_heads * llm.head_dim * itemsize
    return {"weights": int(weights), "kv_cache": float(kv), "total": float(weights + kv)}


def run_ours(bench: dict, batch: int, reps: int, warmup: int) -> dict:
    import jax

    from vlm_jax.inference import generate as gen
    from vlm_jax.models.vlm import init_params

    model_config = bench_model_config(bench, "float32")
    params = jax.jit(init_params, static_argnums=0)(model_config, jax.random.key(0))
    settings = bench["generate"]
    text_len, new_tokens = settings["prompt_text_len"], settings["new_tokens"]
    rng = np.random.default_rng(1)
    image_tokens = np.full((batch, bench["num_image_tokens"]), model_config.image_token_id)
    text = rng.integers(0, model_config.image_token_id, (batch, text_len))
    input_ids = np.concatenate([image_tokens, text], 1).astype(np.int32)
    lengths = np.full((batch,), input_ids.shape[1], np.int32)
    size = bench["image_size"]
    images = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)

    def call(n: int) -> float:
        start = time.perf_counter()
        gen.generate(model_config, params, input_ids, lengths, images, n)  # returns numpy
        return time.perf_counter() - start

    for _ in range(warmup):
        call(new_tokens), call(1)
    totals, totals_1, foreign = [], [], []
    for rep in range(reps):
        load = ForeignLoad().start()
        totals.append(call(new_tokens))
        totals_1.append(call(1))
        foreign.append(load.stop())
        log(f"[ours b{batch}] rep {rep}: total={totals[-1]:.3f}s ttft={totals_1[-1] * 1e3:.1f}ms "
            f"foreign_cpu_frac={foreign[-1]:.3f}")
    copy = copy_rate_gb_s()
    ttft = statistics.median(totals_1)
    step = (statistics.median(totals) - ttft) / (new_tokens - 1)
    return {"batch_size": batch, "prompt_len": int(input_ids.shape[1]), "new_tokens": new_tokens,
            "ttft_s": ttft, "decode_step_s": step, "total_s": totals, "total_1tok_s": totals_1,
            "foreign_cpu_frac": foreign, "copy_rate_gb_s": copy,
            "decode_bytes": decode_bytes_per_step(model_config, batch, int(input_ids.shape[1]),
                                                  new_tokens),
            "jax": jax.__version__}


def run_subprocess(cmd: list[str], json_out: str, label: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return train_throughput.run_subprocess(
        cmd, env, json_out, label,
        echo=lambda line: line.startswith("[ours") or line.startswith("[generate] rep"))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--peer", default=None, help="peer script (default: next to --config)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--reps", type=int, default=10, help="timed reps (the peer's default: 10)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "generate_throughput.json"))
    ap.add_argument("--worker-batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    with open(args.config) as f:
        bench = json.load(f)
    warmup = max(1, bench["timing"]["warmup_steps"])

    if args.worker_batch is not None:
        with open(args.json_out, "w") as f:
            json.dump(run_ours(bench, args.worker_batch, args.reps, warmup), f)
        return

    peer_script = args.peer or os.path.join(os.path.dirname(os.path.abspath(args.config)),
                                            "peer_hf_llava.py")
    work = tempfile.mkdtemp(prefix="generate_throughput_")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        entry = {"batch_size": batch, "loadavg_start": os.getloadavg()}
        ours_out = os.path.join(work, f"ours_b{batch}.json")
        entry["ours"] = run_subprocess(
            [sys.executable, os.path.abspath(__file__), "--config", args.config, "--reps",
             str(args.reps), "--worker-batch", str(batch), "--json-out", ours_out],
            ours_out, f"ours b{batch}")
        if not args.skip_peer:
            config_copy = os.path.join(work, f"bench_b{batch}.json")
            with open(config_copy, "w") as f:
                json.dump({**bench, "generate": {**bench["generate"], "batch_size": batch}}, f)
            peer_out = os.path.join(work, f"peer_b{batch}.json")
            entry["peer"] = run_subprocess(
                [sys.executable, peer_script, "--config", config_copy, "--mode", "generate",
                 "--gen-reps", str(args.reps), "--json-out", peer_out],
                peer_out, f"peer b{batch}")["generate"]
        entry["loadavg_end"] = os.getloadavg()
        results.append(entry)

    rows = [summarize(entry) for entry in results]
    report = {"config": os.path.abspath(args.config), "bench": bench, "rows": rows,
              "runs": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_table(rows)
    log(f"wrote {args.out}")


def summarize(entry: dict) -> dict:
    ours, batch = entry["ours"], entry["batch_size"]
    bytes_per_step = ours["decode_bytes"]["total"]
    bound_step = bytes_per_step / (ours["copy_rate_gb_s"] * 1e9)
    row = {"batch_size": batch, "ours_ttft_ms": 1e3 * ours["ttft_s"],
           "ours_decode_step_ms": 1e3 * ours["decode_step_s"],
           "ours_decode_tokens_per_s": batch / ours["decode_step_s"],
           "decode_bytes_mb": bytes_per_step / 1e6, "copy_rate_gb_s": ours["copy_rate_gb_s"],
           "bound_step_ms": 1e3 * bound_step, "ours_fraction_of_bound": bound_step /
           ours["decode_step_s"], "ours_max_foreign": max(ours["foreign_cpu_frac"])}
    peer = entry.get("peer")
    if peer is not None:
        step = peer["derived_decode_latency_s_(TN-T1)/(N-1)"]
        row.update({"peer_ttft_ms": 1e3 * peer["median_ttft_s"], "peer_decode_step_ms": 1e3 * step,
                    "peer_decode_median_interval_ms": 1e3 * peer["median_decode_latency_s"],
                    "peer_decode_tokens_per_s": batch / step,
                    "peer_fraction_of_bound": bound_step / step,
                    "peer_max_foreign": max(peer["rep_foreign_cpu_frac"]),
                    "ttft_ratio_peer_over_ours": peer["median_ttft_s"] / ours["ttft_s"],
                    "decode_speedup_ours_vs_peer": step / ours["decode_step_s"]})
    return row


def print_table(rows: list[dict]) -> None:
    log(f"\n{'':10s} {'side':6s} {'TTFT ms':>9s} {'step ms':>9s} {'tok/s':>8s} {'of bound':>9s} "
        f"{'foreign':>8s}")
    for row in rows:
        b = row["batch_size"]
        log(f"batch {b:<4d} {'ours':6s} {row['ours_ttft_ms']:9.1f} {row['ours_decode_step_ms']:9.2f} "
            f"{row['ours_decode_tokens_per_s']:8.1f} {row['ours_fraction_of_bound']:9.2f} "
            f"{row['ours_max_foreign']:8.3f}")
        if "peer_ttft_ms" in row:
            log(f"{'':10s} {'peer':6s} {row['peer_ttft_ms']:9.1f} {row['peer_decode_step_ms']:9.2f} "
                f"{row['peer_decode_tokens_per_s']:8.1f} {row['peer_fraction_of_bound']:9.2f} "
                f"{row['peer_max_foreign']:8.3f}   (peer median streamer interval "
                f"{row['peer_decode_median_interval_ms']:.2f} ms)")
            log(f"{'':10s} ours: TTFT {row['ttft_ratio_peer_over_ours']:.2f}x lower, decode "
                f"{row['decode_speedup_ours_vs_peer']:.2f}x faster")
        log(f"{'':10s} bound: {row['decode_bytes_mb']:.1f} MB read per step / copy rate "
            f"{row['copy_rate_gb_s']:.1f} GB/s = {row['bound_step_ms']:.2f} ms per step (bytes copied "
            f"per second; the copy's read + write traffic is twice that)")


if __name__ == "__main__":
    main()
