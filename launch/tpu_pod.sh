#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, ship this checkout to every worker, install,
# start the same training command on all workers (jax.distributed finds the pod by itself), stream worker 0's log.
#
# Usage: launch/tpu_pod.sh CONFIG[:stage] [--dry-run] [--name N] [--zone Z] [--accelerator T] [--runtime V]
#                          [--workdir gs://...] [--spot] [-- extra train flags, e.g. --config.total_steps=100]
# Environment defaults: TPU_NAME (me5-jax), TPU_ZONE (us-central2-b), TPU_ACCELERATOR (v4-256),
#   TPU_RUNTIME (tpu-ubuntu2204-base), WORKDIR (/mnt/me5/<config>: a folder every worker shares), GCLOUD (gcloud).
# A gs://BUCKET/PATH workdir is mounted with gcsfuse on every worker at /mnt/gcs/BUCKET (gcsfuse installed if
#   missing) and the trainer gets /mnt/gcs/BUCKET/PATH: it writes through the mount, not through a GCS API.
# --dry-run prints every command instead of running it.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
CONFIG=$1; shift
NAME=${TPU_NAME:-me5-jax}
ZONE=${TPU_ZONE:-us-central2-b}
ACCEL=${TPU_ACCELERATOR:-v4-256}
RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}
GCLOUD=${GCLOUD:-gcloud}
DRY=0
SPOT=()
EXTRA=()
CONFIG_BASE=$(basename "${CONFIG%%:*}" .py)
WORKDIR=${WORKDIR:-/mnt/me5/$CONFIG_BASE}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --name) NAME=$2; shift ;;
    --zone) ZONE=$2; shift ;;
    --accelerator) ACCEL=$2; shift ;;
    --runtime) RUNTIME=$2; shift ;;
    --workdir) WORKDIR=$2; shift ;;
    --spot) SPOT=(--spot) ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$ROOT/${CONFIG%%:*}" ] || { echo "tpu_pod.sh: config file ${CONFIG%%:*} not found under $ROOT" >&2; exit 2; }

run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
MOUNT_CMD=""
if [[ $WORKDIR == gs://* ]]; then
  BUCKET=${WORKDIR#gs://}
  BUCKET=${BUCKET%%/*}
  MOUNT=/mnt/gcs/$BUCKET
  WORKDIR=$MOUNT${WORKDIR#gs://"$BUCKET"}
  # shellcheck disable=SC2016  # $(lsb_release ...) and $USER expand on the worker
  MOUNT_CMD='command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }'
  MOUNT_CMD+=" && sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && { mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT; }"
fi
TPU=("$GCLOUD" compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
TARBALL=/tmp/me5_jax-src.tar.gz
REMOTE_DIR=me5_jax_src
TRAIN_CMD="cd $REMOTE_DIR && . .venv/bin/activate && python -m me5_jax.train --config $CONFIG --workdir $WORKDIR"
for a in "${EXTRA[@]}"; do TRAIN_CMD+=" $(printf '%q' "$a")"; done

# 1. Create the slice unless it exists.
if [ "$DRY" = 1 ] || ! "${TPU[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME" "${SPOT[@]}"
fi
# 2. Ship this checkout (tracked files only) to every worker.
run git -C "$ROOT" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$TARBALL" HEAD
run "${TPU[@]}" scp "$TARBALL" "$NAME:~/" "${WHERE[@]}" --worker=all
# 3. Install on every worker.
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="rm -rf $REMOTE_DIR && tar xzf $(basename "$TARBALL") && cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[data]' 'jax[tpu]'"
# 3b. Mount the gs:// workdir's bucket on every worker.
if [ -n "$MOUNT_CMD" ]; then
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$MOUNT_CMD"
fi
# 4. Start training on every worker (same command; process id and count come from the TPU runtime).
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="nohup bash -c '$TRAIN_CMD' > train.log 2>&1 &"
# 5. Stream worker 0's log (process 0 is the only one that logs).
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="tail -n +1 -f train.log"
