#!/usr/bin/env bash
# One lent-GPU session's checks and measurements, in one call of at most ~9 min:
#   bash scripts/gpu_session.sh [OUTDIR]
# Runs on a Hopper GPU machine whose python3 has jax (0.11.2 on the lent
# machines) with CUDA; wheels in .whl/ (flax, optax, chex, ...) are installed
# first when present. Phases run in priority order, each under its own time
# limit (seconds, env T_*), and each writes its log (and RESULTS.md) before the
# next starts, so a slow or failing phase still leaves the others' results.
# Logs and the updated RESULTS.md go to OUTDIR (default $OUT, else
# /tmp/int8jax_gpu). PHASES=tests,repro,step,layers,kernels selects phases.
set -u
outd=${1:-${OUT:-/tmp/int8jax_gpu}}
mkdir -p "$outd"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t_tests=${T_TESTS:-150} t_repro=${T_REPRO:-40} t_step=${T_STEP:-200}
t_layers=${T_LAYERS:-90} t_kernels=${T_KERNELS:-60}
phases=",${PHASES:-tests,repro,step,layers,kernels},"
save() { cp benchmarks/RESULTS.md "$outd/RESULTS.md" 2>/dev/null; }
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$outd/env.txt"
# 1. Correctness of every kernel and path on hardware: the implicit-GEMM conv
#    kernels, the Pallas backend (incl. depthwise on the exact bf16 path) and
#    int8_matmul, against the CPU reference.
if [[ $phases == *,tests,* ]]; then
  echo "== GPU tests (limit ${t_tests}s)"
  timeout "$t_tests" python3 -m pytest -q -m gpu -p no:cacheprovider -n 4 -rf \
    tests/test_int8_conv_kernels.py tests/test_pallas_backend.py tests/test_pallas_kernels.py \
    >"$outd/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$outd/tests.txt" | cut -c1-220
fi
# 2. The XLA:GPU 2x input-gradient result, stage by stage (plain lax, then
#    int8jax's XLA-backend dgrad and the whole op).
if [[ $phases == *,repro,* ]]; then
  echo "== XLA:GPU dgrad reproduction (limit ${t_repro}s)"
  timeout "$t_repro" python3 benchmarks/xla_gpu_dgrad_repro.py --with-int8jax \
    --out "$outd/xla_gpu_dgrad_repro.json" >"$outd/repro.txt" 2>&1
  echo "repro rc=$?"; grep -E "verdict|WRONG|x2|differ|error" "$outd/repro.txt" | cut -c1-220
fi
# 3. Training steps: ResNet-50 and MobileNetV2 (batch 256), float32, bf16,
#    UI8 with bf16 float parts (period 1, and the split-compiled non-measure
#    step), UI8 float32; the period-100 amortised row is derived.
if [[ $phases == *,step,* ]]; then
  echo "== train_step.py steps (limit ${t_step}s)"
  timeout "$t_step" python3 benchmarks/train_step.py --models resnet50,mobilenet_v2 --ops "" \
    --repeats 10 --block steps \
    --step-variants "float32,bf16,ui8-bf16 period 1,ui8-bf16 never,ui8 never" \
    >"$outd/step.txt" 2>&1
  echo "step rc=$?"; grep -E " step: |FAILED|Error|vs bf16" "$outd/step.txt" | cut -c1-300
  save
fi
# 4. Per layer: every distinct ResNet-50 3x3 conv, QuantConv vs the bf16 conv.
if [[ $phases == *,layers,* ]]; then
  echo "== train_step.py layers (limit ${t_layers}s)"
  timeout "$t_layers" python3 benchmarks/train_step.py --models "" --ops resnet50 \
    --ops-kernels 3 --repeats 10 --block layers >"$outd/layers.txt" 2>&1
  echo "layers rc=$?"; grep -E "resnet50 |FAILED|Error" "$outd/layers.txt" | cut -c1-300
  save
fi
# 5. The implicit-GEMM kernels against int8_matmul on the equivalent GEMM and
#    against the bf16 conv (and the weight gradient against the cuBLAS route).
if [[ $phases == *,kernels,* ]]; then
  echo "== kernels.py --implicit-only --quick (limit ${t_kernels}s)"
  timeout "$t_kernels" python3 benchmarks/kernels.py --implicit-only --quick --warmup 3 \
    --iters 20 >"$outd/kernels.txt" 2>&1
  echo "kernels rc=$?"; grep -E "^\| " "$outd/kernels.txt" | tail -15 | cut -c1-200
  save
fi
save
