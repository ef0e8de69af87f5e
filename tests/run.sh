#!/usr/bin/env bash
# The test command: set up the pinned environment, then run the whole suite.
# Extra arguments go to pytest: `bash tests/run.sh -m "not slow"` is the quick run; markers
# (slow, parity, multiprocess) and the 30-slowest list live in tests/conftest.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
cd "$ROOT"
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit $rc
