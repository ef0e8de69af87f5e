"""Everything worth measuring on an accelerator, in one short call (GPU time is scarce):

    python benchmarks/accelerator.py --out /tmp/accel          # on a GPU / TPU: <= 8 minutes
    python benchmarks/accelerator.py --smoke --out /tmp/accel  # the same code on CPU, tiny shapes

Models (random weights, synthetic batches, instruct phase: projector + LLM trained, vision
frozen, its forward counted in the FLOPs):
  bench_s   ../shared/bench/bench_s.json (the CPU comparisons' model)
  nanovlm   SigLIP-B/16-224 + a SmolLM2-135M-shaped Llama, pixel-shuffle projector (49 tokens)
  2b        SigLIP-So400m/14-384 + a Gemma-2B-shaped decoder, mlp2x_gelu projector (729 tokens)

For each run: compile time (the first step, reported apart), median step time, tokens/s, MFU
(model FLOPs from `vlm_jax.train.flops` over the device's datasheet peak for the compute dtype;
on CPU a measured matmul), peak device memory (`memory_stats`, where the backend keeps it).
Variants: f32 vs bf16 compute, bf16 vs f32 master weights, the remat policies, every attention
backend the device offers (cudnn / xla / tpu_flash); KV-cache decode tokens/s at batch 1 and 32.
A variant that fails or does not fit the time budget is listed with why, never dropped silently.
Writes `results.json` and `results.md` under --out and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
BENCH_S = os.path.join(REPO, "..", "shared", "bench", "bench_s.json")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models

def model_configs(smoke: bool) -> dict:
    """name -> (VLMConfig at f32, batch rows, text tokens per row)."""
    from vlm_jax.models.decoder import decoder_config
    from vlm_jax.models.projector import ProjectorConfig
    from vlm_jax.models.siglip import VisionConfig
    from vlm_jax.models.vlm import VLMConfig

    def vlm(vision, projector, llm):
        return VLMConfig(vision=VisionConfig(**vision, use_head=False), projector=projector,
                         llm=llm, image_token_id=llm.vocab_size - 1)

    out = {}  # smoke: bench_s's layout at tiny shapes below (no ../shared needed)
    if not smoke and os.path.exists(BENCH_S):
        from train_throughput import bench_model_config
        with open(BENCH_S) as f:
            bench = json.load(f)
        out["bench_s"] = (bench_model_config(bench, "float32"), bench["batch_size"],
                          bench["text_len"])
    if smoke:
        tiny_vision = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
        tiny_llm = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)
        out["bench_s"] = (vlm(dict(tiny_vision, patch_size=16), ProjectorConfig("mlp2x_gelu"),
                              decoder_config("llama", tie_embeddings=True, **tiny_llm)), 2, 16)
        out["nanovlm"] = (vlm(tiny_vision, ProjectorConfig("pixel_shuffle", mlp_depth=1),
                              decoder_config("llama", tie_embeddings=True, **tiny_llm)), 2, 16)
        out["2b"] = (vlm(tiny_vision, ProjectorConfig("mlp2x_gelu"),
                         decoder_config("gemma", **tiny_llm)), 2, 16)
        return out
    siglip_b = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                    feature_layer=-1)
    smollm2 = decoder_config("llama", vocab_size=49152, hidden_size=576, num_layers=30,
                             num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536,
                             tie_embeddings=True, norm_eps=1e-5, rope_theta=100000.0)
    out["nanovlm"] = (vlm(siglip_b, ProjectorConfig("pixel_shuffle", mlp_depth=1, bias=False),
                          smollm2), 32, 256)
    so400m = dict(image_size=384, patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304,
                  feature_layer=-2)
    gemma2b = decoder_config("gemma", vocab_size=256000, hidden_size=2048, num_layers=18,
                             num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16384)
    out["2b"] = (vlm(so400m, ProjectorConfig("mlp2x_gelu"), gemma2b), 8, 512)
    return out


def synthetic_batch(config, batch: int, text_len: int, seed: int = 0) -> dict:
    """Image tokens first, then text; the loss on every text token."""
    import numpy as np
    rng = np.random.default_rng(seed)
    image_tokens = config.tokens_per_image
    seq = image_tokens + text_len
    text = rng.integers(0, config.image_token_id, (batch, text_len))
    input_ids = np.concatenate([np.full((batch, image_tokens), config.image_token_id), text], 1)
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, image_tokens - 1:seq - 1] = 1.0
    size = config.vision.image_size
    return {"input_ids": input_ids.astype(np.int32),
            "target_ids": np.roll(input_ids, -1, 1).astype(np.int32), "loss_mask": loss_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "mask_ar": np.ones((batch, seq), np.int32),
            "images": rng.uniform(-1, 1, (batch, 1, size, size, 3)).astype(np.float32)}


# ----------------------------------------------------------------------------- measurements

def peak_memory_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def train_run(name: str, config, batch: int, text_len: int, dtype: str, param_dtype: str,
              remat: str, backend: str, steps: int) -> dict:
    import jax
    from vlm_jax import sharding
    from vlm_jax.train import flops
    from vlm_jax.train.optimizer import OptimizerConfig
    from vlm_jax.train.phases import PhaseConfig
    from vlm_jax.train.step import TrainStepConfig, create_train_state, make_train_step, plan_training

    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat,
                                 attention_backend=backend)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=1e-4, schedule="constant", grad_clip_norm=1.0)
    plan = plan_training(config, TrainStepConfig(PhaseConfig("instruct"), optimizer), mesh)
    state = create_train_state(plan, jax.random.key(0))
    step = make_train_step(plan)
    data = sharding.global_batch(synthetic_batch(config, batch, text_len), mesh)
    start = time.perf_counter()
    state, metrics = step(state, data)
    float(metrics["loss"])
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    seq = config.tokens_per_image + text_len
    model_flops = flops.train_step_flops(config, plan.config.phase, batch, seq).total
    peak = flops.peak_flops_per_device(jax.devices()[0], dtype)
    return {"kind": "train", "model": name, "dtype": dtype, "param_dtype": param_dtype,
            "remat": remat, "attention": backend, "batch": batch, "seq_len": seq,
            "compile_s": compile_s, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
            "model_tflops_per_step": model_flops / 1e12,
            "mfu": flops.mfu(model_flops, step_s, peak),
            "peak_memory_gib": (peak_memory_bytes(jax.devices()[0]) or 0) / 2**30 or None,
            "loss": float(metrics["loss"])}


def decode_run(name: str, config, batch: int, prompt_text: int, new_tokens: int,
               dtype: str) -> dict:
    import jax
    import numpy as np
    from vlm_jax.inference.generate import GREEDY, generate
    from vlm_jax.models.vlm import init_params

    config = dataclasses.replace(config, dtype=dtype)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    example = synthetic_batch(config, batch, prompt_text)
    ids, images = example["input_ids"], example["images"]
    lengths = np.full((batch,), ids.shape[1], np.int32)

    def timed(n):
        start = time.perf_counter()
        generate(config, params, ids, lengths, images, n, GREEDY)
        return time.perf_counter() - start

    start = time.perf_counter()
    timed(1), timed(new_tokens)
    compile_s = time.perf_counter() - start
    one = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(new_tokens) for _ in range(3))
    step_s = (full - one) / (new_tokens - 1)
    if step_s <= 0:  # a tiny (smoke) model's steps vanish in the calls' noise
        step_s = None
    return {"kind": "decode", "model": name, "dtype": dtype, "batch": batch,
            "prompt_len": ids.shape[1], "new_tokens": new_tokens, "compile_s": compile_s,
            "ttft_s": one, "decode_step_s": step_s,
            "decode_tokens_per_s": None if step_s is None else batch / step_s}


def attention_backends() -> list[str]:
    import jax
    backend = jax.default_backend()
    return {"gpu": ["cudnn", "xla"], "tpu": ["tpu_flash", "xla"]}.get(backend, ["xla"])


def plan_runs(smoke: bool) -> list[tuple]:
    """(label, function name, kwargs) in priority order: the budget cuts from the end."""
    runs = []
    bf16 = dict(dtype="bfloat16", param_dtype="float32")
    for model in ("bench_s", "nanovlm", "2b"):
        runs.append((f"{model} bf16", "train", dict(model=model, **bf16, remat="full",
                                                    backend="auto")))
    runs.append(("nanovlm f32", "train", dict(model="nanovlm", dtype="float32",
                                              param_dtype="float32", remat="full", backend="auto")))
    runs.append(("nanovlm bf16 master weights", "train",
                 dict(model="nanovlm", dtype="bfloat16", param_dtype="bfloat16", remat="full",
                      backend="auto")))
    for remat in ("none", "dots_no_batch"):
        runs.append((f"nanovlm bf16 remat {remat}", "train",
                     dict(model="nanovlm", **bf16, remat=remat, backend="auto")))
    for backend in attention_backends():
        runs.append((f"nanovlm bf16 attention {backend}", "train",
                     dict(model="nanovlm", **bf16, remat="full", backend=backend)))
    runs.append(("2b bf16 remat dots_no_batch", "train",
                 dict(model="2b", **bf16, remat="dots_no_batch", backend="auto")))
    for batch in (1, 32):
        runs.append((f"nanovlm decode batch {batch}", "decode",
                     dict(model="nanovlm", batch=batch, dtype="bfloat16")))
    if smoke:  # every code path once (each model, a master-weight dtype, a remat, decode)
        keep = {"bench_s bf16", "nanovlm bf16", "2b bf16", "nanovlm bf16 master weights",
                "nanovlm bf16 remat dots_no_batch", "nanovlm decode batch 1"}
        runs = [r for r in runs if r[0] in keep]
    return runs


def markdown(device: str, rows: list[dict], failures: list[dict]) -> str:
    lines = [f"Device: {device}", "",
             "| run | batch x seq | compile s | step s | tokens/s | MFU | peak mem GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train":
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
            lines.append(f"| {r['label']} | {r['batch']} x {r['seq_len']} | {r['compile_s']:.1f} | "
                         f"{r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} |")
    decode = [r for r in rows if r["kind"] == "decode"]
    if decode:
        lines += ["", "| decode | batch | prompt | TTFT s | step ms | tokens/s |",
                  "|---|---|---|---|---|---|"]
        for r in decode:
            step = r["decode_step_s"]
            speed = ("n/a (below timing noise)", "n/a") if step is None else (
                f"{1e3 * step:.2f}", f"{r['decode_tokens_per_s']:.0f}")
            lines.append(f"| {r['label']} | {r['batch']} | {r['prompt_len']} | {r['ttft_s']:.3f} | "
                         f"{speed[0]} | {speed[1]} |")
    if failures:
        lines += ["", "Not run:"] + [f"- {f['label']}: {f['why']}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device: the CI check")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting runs after this many seconds (default 420; smoke 120)")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; smoke 2)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"--out {args.out} already holds files; give an empty or new directory")
    os.makedirs(args.out, exist_ok=True)
    import jax

    budget = args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 420.0)
    steps = args.steps or (2 if args.smoke else 5)
    device = jax.devices()[0]
    device_line = f"{jax.default_backend()} {device.device_kind} (jax {jax.__version__})"
    log(f"[accelerator] {device_line}; budget {budget:.0f} s")
    configs = model_configs(args.smoke)
    started = time.perf_counter()
    rows, failures = [], []
    for label, kind, kwargs in plan_runs(args.smoke):
        elapsed = time.perf_counter() - started
        model = kwargs["model"]
        if model not in configs:
            failures.append({"label": label, "why": f"model {model} unavailable (no {BENCH_S})"})
            continue
        if elapsed > budget:
            failures.append({"label": label, "why": f"time budget ({budget:.0f} s) spent"})
            continue
        config, batch, text_len = configs[model]
        log(f"[accelerator] {label} ...")
        try:
            if kind == "train":
                row = train_run(model, config, batch, text_len, kwargs["dtype"],
                                kwargs["param_dtype"], kwargs["remat"], kwargs["backend"], steps)
            else:
                row = decode_run(model, config, kwargs["batch"], 16 if args.smoke else 32,
                                 16 if args.smoke else 32, kwargs["dtype"])
            rows.append(dict(row, label=label))
        except Exception as e:  # noqa: BLE001  a variant that cannot run is reported, not fatal
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failures.append({"label": label, "why": why})
            log(traceback.format_exc(limit=3))
    table = markdown(device_line, rows, failures)
    result = {"device": device_line, "smoke": args.smoke, "wall_s": time.perf_counter() - started,
              "rows": rows, "not_run": failures}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
