#!/usr/bin/env bash
# Train on one host with all of its GPUs (one JAX process sees every local GPU; the mesh spans them).
# Usage: launch/gpu.sh CONFIG[:stage] WORKDIR [extra train flags, e.g. --config.batch_size=4096]
# Multi-host GPU: run this on every host with ME5_COORDINATOR=host0:port ME5_NUM_PROCESSES=N ME5_PROCESS_ID=i.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
CONFIG=$1; WORKDIR=$2; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m me5_jax.train --config "$ROOT/$CONFIG" --workdir "$WORKDIR" "$@"
