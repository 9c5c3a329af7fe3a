#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 interpreter and install int8jax with its
# examples, benchmark and test dependencies. Safe to rerun (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # This project's machines have python3 = 3.11 and a pyenv 3.12.1.
  for cand in "env PYENV_VERSION=3.12.1 python3.12" python3.13 python3.12 python3; do
    if $cand -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  echo "int8jax needs Python >= 3.12 (jax >= 0.11 does); none found" >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  rm -rf .venv
  PY=$(find_python)
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c 'import jax, flax, optax, int8jax; print("int8jax", int8jax.__version__, "| jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__)'
