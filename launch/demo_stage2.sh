#!/usr/bin/env bash
# Stage 2 on top of the demo (run launch/demo.sh first): mine hard negatives for training verses with the
# stage-1 export, build them as a stage-2 TFDS dataset, fine-tune (InfoNCE over positives + 3 mined hard
# negatives per query, every passage of the global batch a candidate), and print the before → after table
# on the same held-out verses.
# Usage: bash launch/demo_stage2.sh [extra train flags]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/setup_env.sh
source "$ROOT/launch/setup_env.sh" cpu,data,torch
cd "$ROOT"
export ME5_CPU_DEVICES=8 JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}
STAGE1=workdirs/demo/export
OUT=workdirs/demo-stage2
[ -f "$STAGE1/model.safetensors" ] || { echo "demo_stage2.sh: $STAGE1 missing: run bash launch/demo.sh first" >&2; exit 2; }
start=$(date +%s)
if [ ! -f "$OUT/mined/stage2.jsonl" ]; then
  mkdir -p "$OUT/mined"
  python -m data_pipelines.bible --mining-set "$OUT/mining" --every 40 --every-corpus 4
  python -m me5_jax.mine --model "$STAGE1" --queries "$OUT/mining/queries.jsonl" --corpus "$OUT/mining/corpus.jsonl" \
    --qrels "$OUT/mining/qrels.tsv" --out "$OUT/mined/stage2.jsonl.tmp" --top-k 20 --num-negatives 7 \
    --query-prefix "" --passage-prefix "" --max-length 128
  mv "$OUT/mined/stage2.jsonl.tmp" "$OUT/mined/stage2.jsonl"
fi
[ -d "$OUT/tfds/me5_stage2" ] || python -m data_pipelines.build --source stage2 --files "$OUT/mined/stage2.jsonl" --data-dir "$OUT/tfds"
python -m me5_jax.train --config configs/demo.py:finetune --workdir "$OUT/run" "$@"
python -m me5_jax.report --workdir "$OUT/run"
echo "stage 2 finished in $(( $(date +%s) - start )) s; model: $OUT/run/export"
