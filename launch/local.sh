#!/usr/bin/env bash
# The embedded default from a fresh clone: install the pinned environment (launch/setup_env.sh,
# once), then train the shapes recipe's four phases on this machine's CPU and evaluate it.
# Extra arguments go to the recipe (e.g. `bash launch/local.sh --workdir /tmp/shapes`); running
# it again resumes / skips finished phases.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
started=$(date +%s)
bash "$ROOT/launch/setup_env.sh"
echo "[local] environment ready in $(( $(date +%s) - started )) s" >&2
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
cd "$ROOT"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m configs.shapes.run "$@"
