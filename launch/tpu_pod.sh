#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, install this checkout on every worker, run the same
# `vlm-jax train` on all workers at once (jax.distributed finds the slice by itself), stream
# their output here, and delete the slice when the run ends (also on failure or Ctrl-C).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE[:ARG]
                         --workdir gs://BUCKET/PATH [options] [-- EXTRA vlm-jax train ARGS]

  --name NAME               TPU VM (and queued resource) name
  --zone ZONE               e.g. us-central2-b (v4), us-east5-a (v5p), us-east1-d (v6e)
  --accelerator-type TYPE   slice type, e.g. v4-32, v5p-64, v5litepod-16, v6e-16
  --runtime-version V       TPU software version; default by TPU generation:
                              v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                              v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
  --project PROJECT         GCP project (default: gcloud's configured project)
  --config FILE[:ARG]       training config, relative to the repository root
  --workdir gs://B/PATH     run directory in a bucket; every worker mounts the bucket with gcsfuse
                            at ~/gcs/B and trains in ~/gcs/B/PATH (checkpoints need one shared
                            directory; use a hierarchical-namespace bucket: atomic folder renames)
  --queued                  create through a queued resource (waits for capacity) instead of
                            `tpu-vm create`
  --spot                    spot capacity (preemptible: the run saves on SIGTERM; launch again
                            with the same --workdir to resume)
  --existing                use a slice that already exists (nothing is created)
  --keep                    do not delete the slice at the end
  --python PY               Python >= 3.11 to create the workers' venv with (default python3.11,
                            installed from apt when missing)
  --dry-run                 print every command (local and remote) without running any
  -h, --help                this text

Everything after `--` goes to `vlm-jax train`, e.g. `-- --config.train.steps=1000`.
The code shipped is the committed HEAD of this checkout (`git archive`).
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME="" ZONE="" TYPE="" RUNTIME="" PROJECT="" CONFIG="" WORKDIR="" PY="python3.11"
QUEUED=0 SPOT=0 EXISTING=0 KEEP=0 DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--zone|--accelerator-type|--runtime-version|--project|--config|--workdir|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator-type) TYPE="$2"; shift 2 ;;
    --runtime-version) RUNTIME="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --existing) EXISTING=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done
for required in NAME ZONE TYPE CONFIG WORKDIR; do
  [[ -n "${!required}" ]] || { usage >&2; die "missing --$(tr 'A-Z_' 'a-z-' <<<"$required" \
    | sed 's/^type$/accelerator-type/')"; }
done
[[ "$WORKDIR" =~ ^gs://([^/]+)(/(.*))?$ ]] || die "--workdir must be gs://BUCKET/PATH, got $WORKDIR"
BUCKET="${BASH_REMATCH[1]}"
RUN_PATH="${BASH_REMATCH[3]}"
[[ -n "$RUN_PATH" ]] || die "--workdir gs://$BUCKET needs a path inside the bucket"
if [[ -z "$RUNTIME" ]]; then
  case "$TYPE" in
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v5litepod-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    *) die "no default --runtime-version for --accelerator-type $TYPE; pass one" ;;
  esac
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
TARBALL="${TMPDIR:-/tmp}/vlm_jax-$NAME.tar.gz"
GCLOUD_WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_WHERE+=(--project="$PROJECT")

# Print a command (shell-quoted, pasteable), then run it unless --dry-run.
run() {
  print_command "$@"
  [[ $DRY_RUN -eq 1 ]] || "$@"
}
# One line of shell steps (`set -e; step; step ...`), run on every worker at once; gcloud
# streams every worker's output here.
on_all_workers() {
  local script="set -e" step
  for step in "$@"; do script+="; $step"; done
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_WHERE[@]}" --worker=all --command="$script"
}

delete_slice() {
  if [[ $QUEUED -eq 1 ]]; then  # --force deletes the node with its queued resource
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_WHERE[@]}" --quiet
  fi
}

# ---------------------------------------------------------------- 1. the slice
if [[ $EXISTING -eq 0 ]]; then
  [[ $KEEP -eq 1 ]] || trap delete_slice EXIT
  SPOT_FLAG=()
  [[ $SPOT -eq 1 ]] && SPOT_FLAG=(--spot)
  if [[ $QUEUED -eq 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_WHERE[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
    STATE_CMD=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_WHERE[@]}"
               --format='value(state.state)')
    echo "$(print_command "${STATE_CMD[@]}")  # every 30 s until ACTIVE"
    if [[ $DRY_RUN -eq 0 ]]; then
      while state="$("${STATE_CMD[@]}")" && [[ "$state" != ACTIVE ]]; do
        [[ "$state" == FAILED || "$state" == SUSPENDED ]] && die "queued resource $NAME is $state"
        echo "[tpu_pod] queued resource $NAME: $state" >&2
        sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_WHERE[@]}" \
      --accelerator-type="$TYPE" --version="$RUNTIME" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
  fi
fi

# ---------------------------------------------------------------- 2. the code, on every worker
run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:vlm_jax.tar.gz" "${GCLOUD_WHERE[@]}" --worker=all
GCSFUSE_APT='echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null'
on_all_workers \
  "rm -rf ~/vlm_jax && mkdir -p ~/vlm_jax && tar -xzf ~/vlm_jax.tar.gz -C ~/vlm_jax" \
  "command -v gcsfuse >/dev/null || { $GCSFUSE_APT; sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse; }" \
  "command -v $PY >/dev/null || { sudo apt-get update -qq; sudo apt-get install -y -qq $PY $PY-venv; }" \
  "[[ -x ~/vlm_jax_venv/bin/python ]] || $PY -m venv ~/vlm_jax_venv" \
  "~/vlm_jax_venv/bin/pip install -q --upgrade pip" \
  "~/vlm_jax_venv/bin/pip install -q -c ~/vlm_jax/launch/constraints.txt -e ~/vlm_jax 'jax[tpu]'"

# ---------------------------------------------------------------- 3. the run, on every worker
# The mount path differs per user ($HOME), so the workdir is spelled on the worker.
TRAIN_ARGS="$(print_command --config "$CONFIG" ${EXTRA[@]+"${EXTRA[@]}"})"
TRAIN_ARGS="${TRAIN_ARGS#+}"
echo "[tpu_pod] $NAME ($TYPE, $RUNTIME): training in $WORKDIR, commit $(git -C "$ROOT" rev-parse --short HEAD)" >&2
on_all_workers \
  "mkdir -p ~/gcs/$BUCKET" \
  "mountpoint -q ~/gcs/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET ~/gcs/$BUCKET" \
  "cd ~/vlm_jax" \
  "PATH=~/vlm_jax_venv/bin:\$PATH exec vlm-jax train$TRAIN_ARGS --workdir ~/gcs/$BUCKET/$(quote_word "$RUN_PATH")"
# 4. the EXIT trap deletes the slice (unless --keep or --existing)
