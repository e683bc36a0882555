#!/usr/bin/env bash
# Train on this machine's CPU with simulated devices (default 8), inside the project's virtualenv.
# Usage: launch/local.sh CONFIG[:stage] WORKDIR [extra train flags]   (ME5_CPU_DEVICES=N to change the count)
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
CONFIG=$1; WORKDIR=$2; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/setup_env.sh
source "$ROOT/launch/setup_env.sh" cpu,data
export JAX_PLATFORMS=cpu ME5_CPU_DEVICES=${ME5_CPU_DEVICES:-8}
exec python -m me5_jax.train --config "$ROOT/$CONFIG" --workdir "$WORKDIR" "$@"
