#!/usr/bin/env bash
# Decode speed of an older commit and of the working tree, back to back on this machine:
#   bash benchmarks/generate_before_after.sh <rev> [rounds]
# Alternates the two sides `rounds` times (default 2), ours only, and prints one row per run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REV="$1"; ROUNDS="${2:-2}"
PY="$ROOT/.venv/bin/python"
BEFORE="$(mktemp -d)/before"
git -C "$ROOT" worktree add -f -q "$BEFORE" "$REV"
trap 'git -C "$ROOT" worktree remove --force "$BEFORE"' EXIT
lscpu | grep "Model name" || true
"$PY" -c "
import numpy as np, time
a = np.random.rand(4096, 4096).astype(np.float32); a @ a
t = time.perf_counter(); a @ a; dt = time.perf_counter() - t
print(f'numpy 4096^2 f32 matmul: {2*4096**3/dt/1e9:.0f} GFLOP/s')"
echo "| side | round | batch | TTFT ms | decode step ms | decode tok/s | foreign |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    checkout="$ROOT"; [ "$side" = before ] && checkout="$BEFORE"
    out="$(mktemp --suffix=.json)"
    PYTHONPATH="$checkout" HF_HUB_OFFLINE=1 "$PY" "$checkout/benchmarks/generate_throughput.py" \
      --config "$ROOT/../shared/bench/bench_s.json" --skip-peer --out "$out" > /dev/null 2>&1
    "$PY" -c "
import json, sys
for r in json.load(open('$out'))['rows']:
    print(f\"| $side | $round | {r['batch_size']} | {r['ours_ttft_ms']:.1f} | {r['ours_decode_step_ms']:.2f} | \"
          f\"{r['ours_decode_tokens_per_s']:.1f} | {r['ours_max_foreign']:.2f} |\")"
  done
done
