#!/usr/bin/env bash
# The test command: set up the pinned environment, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k parity -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
cd "$ROOT"
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q --durations=30 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit $rc
