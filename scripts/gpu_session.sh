#!/usr/bin/env bash
# One lent-GPU session's checks, in one call (see benchmarks/RESULTS.md):
#   bash scripts/gpu_session.sh [OUTDIR]
# Runs on a Hopper GPU machine whose python3 has jax (0.11.2 on the lent
# machines) with CUDA; wheels in .whl/ (flax, optax) are installed first when
# present. Phases have their own time limits so that a slow or failing phase
# still leaves the others' results; logs and the updated RESULTS.md go to
# OUTDIR (default $OUT, else /tmp/int8jax_gpu).
set -u
outd=${1:-${OUT:-/tmp/int8jax_gpu}}
mkdir -p "$outd"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t_tests=${T_TESTS:-120} t_kernels=${T_KERNELS:-110} t_step=${T_STEP:-260}
phases=",${PHASES:-tests,kernels,step},"   # which phases to run
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$outd/env.txt"
if [[ $phases == *,tests,* ]]; then
  echo "== GPU tests (limit ${t_tests}s)"
  timeout "$t_tests" python3 -m pytest -q -m gpu -p no:cacheprovider -n 4 -rf \
    tests/test_pallas_kernels.py tests/test_pallas_backend.py >"$outd/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$outd/tests.txt" | cut -c1-220
fi
if [[ $phases == *,kernels,* ]]; then
  echo "== kernels.py --quick (limit ${t_kernels}s)"
  timeout "$t_kernels" python3 benchmarks/kernels.py --quick --warmup 3 --iters 20 \
    >"$outd/kernels.txt" 2>&1
  echo "kernels rc=$?"; grep -E "^\| (square|l[0-9])" "$outd/kernels.txt" | cut -c1-200
fi
if [[ $phases == *,step,* ]]; then
  echo "== train_step.py ResNet-50 (limit ${t_step}s)"
  timeout "$t_step" python3 benchmarks/train_step.py --models resnet50 --ops resnet50 \
    --ops-kernels 3 --repeats 10 \
    --step-variants "float32,bf16,ui8 non-measure,ui8 period 1" >"$outd/step.txt" 2>&1
  echo "step rc=$?"; grep -E "resnet50 |FAILED|Error" "$outd/step.txt" | cut -c1-300
fi
cp benchmarks/RESULTS.md "$outd/RESULTS.md"
