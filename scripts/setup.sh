#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 interpreter and install int8jax with its
# examples, benchmark and test dependencies. Safe to rerun (idempotent).
#   bash scripts/setup.sh                          # finds python3.13 / 3.12 / python3
#   PYTHON=/path/to/python3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

version_ok='import sys; sys.exit(sys.version_info < (3, 12))'
version_of='import sys; print("Python %d.%d.%d" % sys.version_info[:3])'

find_python() {
  # This project's machines have python3 = 3.11 and a pyenv 3.12.1.
  local cands=() found="" cand ver
  if [ -n "${PYTHON:-}" ]; then cands=("$PYTHON"); fi
  cands+=("env PYENV_VERSION=3.12.1 python3.12" python3.13 python3.12 python3)
  for cand in "${cands[@]}"; do
    ver=$($cand -c "$version_of" 2>/dev/null) || continue
    if $cand -c "$version_ok" 2>/dev/null; then
      echo "$cand"; return 0
    fi
    found="$found\n  ${cand##* }: $ver"
  done
  printf '%b\n' "int8jax needs Python >= 3.12: jax >= 0.11 supports no older Python (with one,
pip only lists jax versions it cannot install). Found:${found:-\n  no python3 at all}
Install Python 3.12 or newer (e.g. 'pyenv install 3.12' or your system's python3.12
package) and rerun, or point this script at one:
  PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "$version_ok" 2>/dev/null; then
  PY=$(find_python)
  rm -rf .venv
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c 'import jax, flax, optax, int8jax; print("int8jax", int8jax.__version__, "| jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__)'
