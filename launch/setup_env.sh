#!/usr/bin/env bash
# Create (or reuse) ./.venv with the pinned dependencies and vlm_jax installed in editable mode.
# Idempotent: re-running with an unchanged constraints file and setup.py does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.vlm_jax_stamp"
WANT="$(cat "$ROOT/launch/constraints.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup_env] installing pinned dependencies into $VENV (about 2 minutes the first time)" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
# torch first and alone: it must come from the local CPU wheel, never a CUDA build.
"$VENV/bin/python" -m pip install -q -c "$ROOT/launch/constraints.txt" torch 2>&1 | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -m pip install -q -c "$ROOT/launch/constraints.txt" -e "$ROOT[torch,dev]" 2>&1 | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -c "import jax, flax, grain, orbax.checkpoint, torch, transformers, vlm_jax" \
  || { echo "[setup_env] install failed: see pip output above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
