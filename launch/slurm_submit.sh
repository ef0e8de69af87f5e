#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch with the allocation given as flags; with --dry-run, print the
# sbatch command and what the job would run on each node (srun line, every task's command)
# without submitting anything (no SLURM client needed).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm_submit.sh [--nodes N] [--gpus-per-node G] [--partition P] [--account A]
                              [--time HH:MM:SS] [--job-name NAME] [--dry-run]
                              -- --config FILE[:ARG] --workdir SHARED_DIR [--config.a.b=V ...]

  --nodes N            nodes, one training process each (default 2)
  --gpus-per-node G    GPUs per node, all visible to that node's process (default 8)
  --partition P, --account A, --time T, --job-name NAME   passed to sbatch
  --dry-run            print the commands, submit nothing

Run from the repository root: the job runs the checkout it was submitted from, with the
virtualenv in $VLM_JAX_VENV (default ./.venv).
EOF
}

NODES=2 GPUS=8 DRY_RUN=0
SBATCH_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes|--gpus-per-node|--partition|--account|--time|--job-name)
      [[ $# -ge 2 ]] || { echo "slurm_submit.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --partition|--account|--time|--job-name) SBATCH_EXTRA+=("$1=$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; echo "slurm_submit.sh: unknown argument $1 (training arguments go after --)" >&2
       exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { usage >&2; echo "slurm_submit.sh: no training arguments after --" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_submit.sh: --nodes must be a positive integer" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
SBATCH=(sbatch --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS" ${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"}
        "$ROOT/launch/slurm_gpu.sbatch" "$@")
print_command "${SBATCH[@]}"
if [[ $DRY_RUN -eq 0 ]]; then
  exec "${SBATCH[@]}"
fi
# What the job does once it starts, on a stand-in allocation node[0-(N-1)].
SLURM_JOB_NODELIST="node[0-$((NODES - 1))]" SLURM_JOB_NUM_NODES="$NODES" SLURM_SUBMIT_DIR="$ROOT" \
  VLM_JAX_DRY_RUN=1 bash "$ROOT/launch/slurm_gpu.sbatch" "$@"
