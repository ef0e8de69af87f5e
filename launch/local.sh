#!/usr/bin/env bash
# The embedded default from a fresh clone: install the pinned environment (launch/setup_env.sh,
# once), then train the shapes recipe's four phases on this machine's CPU and evaluate it.
# Extra arguments go to the recipe (e.g. `bash launch/local.sh --workdir /tmp/shapes`); running
# it again resumes / skips finished phases. `--dry-run` prints the commands and runs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == --dry-run ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
RECIPE=(env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m configs.shapes.run
        ${ARGS[@]+"${ARGS[@]}"})
if [[ $DRY_RUN -eq 1 ]]; then
  source "$ROOT/launch/common.sh"
  print_command bash "$ROOT/launch/setup_env.sh"
  print_command cd "$ROOT"
  print_command "${RECIPE[@]}"
  exit 0
fi
started=$(date +%s)
bash "$ROOT/launch/setup_env.sh"
echo "[local] environment ready in $(( $(date +%s) - started )) s" >&2
cd "$ROOT"
"${RECIPE[@]}"
