#!/usr/bin/env bash
# Fill .whl/ with the pure-Python wheels scripts/gpu_session.sh installs on a
# lent GPU machine (which has no network). Run here, before the window:
#
#   bash scripts/gpu_wheels.sh            # then: run(..., carry=[".whl"])
#
# The lent H200 image (Python 3.12.3, jax 0.11.2 + CUDA 13) has numpy, jax,
# msgpack, orbax, tensorstore, rich, pytest, pytest-xdist, ... of its own;
# what travels is what must match this checkout (the versions in .venv) or
# may be missing there: flax, optax, chex, treescope (flax's display
# dependency) and pytest-timeout (gpu_session.sh's per-test time limit).
# All are py3-none-any, a few MB together. One version of each (two stop
# the install); the folder is git-ignored via .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
pins=()
for pkg in flax optax chex treescope; do   # the versions this checkout is tested with
  v=$("$py" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  pins+=("$pkg==$v")
done
pins+=("pytest-timeout==${PYTEST_TIMEOUT_VERSION:-2.4.0}")
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d .whl "${pins[@]}"
ls -l .whl
