#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv at .venv and installs me5_jax with the given extras.
# Usage: source launch/setup_env.sh [EXTRAS]   (default extras: cpu,data,torch)
# Reinstalls only when setup.cfg changed since the last install, so repeated runs cost seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRAS=${1:-cpu,data,torch}
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
fi
STAMP="$VENV/.me5_jax-$EXTRAS-$(sha1sum "$ROOT/setup.cfg" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing me5_jax[$EXTRAS] (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --no-compile -e "${ROOT}[${EXTRAS}]" 2>&1 | grep -vE "is ignored|^\s*$" >&2 || true
  # pip byte-compiles the installed files one at a time (80 of a 120 s install on 2 cores); compileall uses
  # every core. Some packages ship files in other Python dialects that cannot compile: those stay as they are.
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import me5_jax, jax, flax, optax, orbax.checkpoint" || { echo "[setup] install failed" >&2; exit 1; }
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# glibc's malloc on transparent huge pages (for processes started from here on): XLA:CPU mallocs every
# step's temporaries anew, and on 4 KiB pages each step faults them in again (the real mE5-small step:
# 1.5M minor faults and 27 s/step → 4k faults and 18 s/step, BENCHMARKS.md "finetune_step"). Harmless where
# THP is off ("never") and on GPU/TPU hosts. An explicit glibc.malloc.hugetlb in GLIBC_TUNABLES wins.
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
