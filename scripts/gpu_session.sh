#!/usr/bin/env bash
# One lent-GPU window's checks and measurements, result first, in one call of
# at most ~9 min (T_TOTAL, default 530 s):
#
#   bash scripts/gpu_session.sh [OUTDIR]            # on the GPU (OUTDIR: $OUT)
#   GPU_SESSION_DRY=1 bash scripts/gpu_session.sh /tmp/dry   # CPU dry run
#
# Wheels: the GPU machine has no network. Python packages its image may lack
# or has in other versions travel in .whl/ -- flax, optax, chex, treescope,
# pytest-timeout (pure Python; `bash scripts/gpu_wheels.sh` fills .whl/ here;
# call run(..., carry=[".whl"])). They are installed first when present.
#
# Phases, in priority order; each runs under `timeout -k` with its own limit
# (env T_SMOKE, T_FUSIONS, T_STEP, T_DIRECT, T_TESTS, T_KERNELS, T_KERNELS_WS,
# T_KERNELS_DWS, T_REST; never past T_TOTAL) and writes its results to OUTDIR
# before the next starts:
#   0. environment (jax, GPU, driver) and benchmarks/gpu_smoke.py: a tiny
#      forward, input gradient and weight gradient of every kernel config
#      against the CPU reference, each config under its own limit. If any
#      conv/wgrad config fails or hangs, the later phases run with
#      INT8JAX_IMPLICIT_GEMM=0 (im2col / int8_matmul), and summary.txt says so.
#      The smoke test also checks the direct-addressing conv kernels
#      (pallas_kernels.conv_direct and conv_direct_wgrad, never run on a GPU
#      before); their gate key is direct_ok, apart from implicit_ok. Then it checks
#      pallas_kernels.int8_matmul_ws (persistent, warp-specialised GEMM, never
#      run on a GPU either); its key ws_ok gates the int8_matmul_ws tests of
#      phase 2 and its timings in phase 3. After it, the persistent,
#      warp-specialised direct weight gradient (conv_direct_wgrad_ws, never run
#      on a GPU): its key direct_ws_ok gates its tests (phase 2) and timing
#      (phase 3) likewise. Then benchmarks/fusion_check.py
#      (compile only, INT8JAX_DIRECT_CONV=1): which fusions read the float x and
#      dy of a quantized conv -- the traffic model's multi-output-fusion assumption.
#   1. ResNet-50 batch 256, bf16 vs UI8 with bf16 float parts (non-measuring
#      steps), benchmarks/step_time.py: one variant compiled and timed at a
#      time, each row appended to step.md right after its own measurement.
#      Then, only if direct_ok, one more row: ui8-bf16 never with
#      INT8JAX_DIRECT_CONV=1 (forward, dgrad (any stride) and wgrad on the
#      direct kernels; 20 steps), its own table in step.md.
#   2. the GPU tests (-m gpu -v, per-test timeout), every kernel config
#      (tests/test_int8_matmul_ws.py too, last, only if ws_ok;
#      tests/test_conv_direct_wgrad_ws.py only if direct_ws_ok).
#   3. benchmarks/kernels.py --implicit-only: all 11 layers, forward, input
#      and weight gradients timed separately on argument operands (with
#      --with-ws if ws_ok: int8_matmul_ws on int8_matmul's GEMMs too); then,
#      only if ws_ok, kernels.py --square-only --with-ws: 4096^3 and 8192^3,
#      int8_matmul vs int8_matmul_ws vs XLA int8 / bf16 (T_KERNELS_WS); then,
#      only if direct_ws_ok, kernels.py --direct-wgrad-only: the direct wgrad
#      vs conv_direct_wgrad_ws on 3 ResNet-50 layers (T_KERNELS_DWS, 30 s;
#      --no-direct-baseline unless direct_ok).
#   4. the rest: MobileNetV2 steps, float32 parts, period 1 (the measuring
#      step), the XLA:GPU 2x-dgrad repro, train_step.py's per-layer table
#      (QuantConv vs nnx.Conv, forward and backward as separate programs).
# OUTDIR ends with at most 7 files: summary.txt (what ran, rc, key lines),
# smoke.json (the gate), step.md, RESULTS.md (kernels / period-1 tables),
# xla_gpu_dgrad_repro.json, logs.tar.gz (every log, re-archived after each
# phase). PHASES=0,1,2,3,4 selects phases.
#
# GPU_SESSION_DRY=1: the same command lines on the CPU with tiny shapes,
# interpret mode and short limits, so a typo cannot waste a window
# (SMOKE_ARGS adds arguments to the smoke test, e.g. --fake to act out a hang).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
outd=${1:-${OUT:-/tmp/int8jax_gpu}}
mkdir -p "$outd"
dry=${GPU_SESSION_DRY:-0}
py=${PYTHON:-python3}
phases=",${PHASES:-0,1,2,3,4},"
t_total=${T_TOTAL:-530}
logd=$(mktemp -d /tmp/int8jax_gpu_logs.XXXXXX)
summary=$outd/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS

say() { echo "$*" | tee -a "$summary"; }
archive() {  # every log so far, one file in OUTDIR
  tar -czf "$outd/.logs.tmp" -C "$logd" . 2>/dev/null && mv -f "$outd/.logs.tmp" "$outd/logs.tar.gz"
  cp benchmarks/RESULTS.md "$outd/RESULTS.md" 2>/dev/null
}
left() { echo $((t_total - (SECONDS - start))); }
# run NAME LIMIT CMD...: CMD under `timeout -k 10`, limited to what is left of
# T_TOTAL, output to the log NAME.log; says its rc and time; returns its rc.
run() {
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  (( limit > $(left) - 15 )) && limit=$(( $(left) - 15 ))
  if (( limit < 10 )); then say "-- $name: skipped, ${limit}s left of T_TOTAL=${t_total}s"; return 124; fi
  say "-- $name (limit ${limit}s, at $((SECONDS - start))s): $*"
  timeout -k 10 "$limit" "$@" >>"$logd/$name.log" 2>&1
  rc=$?
  say "-- $name rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIME LIMIT)') in $((SECONDS - t))s"
  return $rc
}
show() { grep -E "$2" "$logd/$1.log" 2>/dev/null | cut -c1-240 | head -"${3:-20}" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" >/dev/null && [[ $dry != 1 ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$logd/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site
  say "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

if [[ $dry == 1 ]]; then  # CPU: tiny shapes, interpret mode, short limits
  say "DRY RUN on the CPU (GPU_SESSION_DRY=1): tiny shapes, interpret mode, nothing measured"
  export JAX_PLATFORMS=cpu
  smoke_args=(--interpret --timeout 40
              --only "conv:CONV_64x128,wgrad:WGRAD_128x64,matmul:NARROW_CONFIG,direct:CONV_64x128,$(
                     )ws:WS_SHORT_CONFIG,direct_ws:DW_WS_64x128")
  t_smoke=${T_SMOKE:-200}
  step_args=(--model resnet20 --batch 4 --steps 2 --warmup 1)
  direct_step_args=(--model resnet20 --batch 4 --steps 2 --warmup 1)
  tests_args=(-k "every_conv_config or wgrad_gpu") xdist_n=0
  kernels_args=(--implicit-only --lower-only) square_args=() dws_args=(--lower-only)
  rest_args=(--batch 2 --steps 1 --warmup 0) ts_args=(--quick --bf16 --batch50 2) rest_model=resnet20
  layers_args=(--ops resnet20 --ops-kernels 1 --quick --bf16)
  mobilenet_variants="ui8-bf16 never" t_rest=${T_REST:-180}  # XLA:CPU's bf16 MobileNetV2 is slow
  fusion_args=(--backend pallas_interpret --batch 2 --side 8 --channels 16 32)
  t_fusions=${T_FUSIONS:-240}
else
  smoke_args=(--timeout 20) t_smoke=${T_SMOKE:-100}  # 22 configs, a few s each
  step_args=(--model resnet50 --batch 256 --steps 30 --warmup 3)
  direct_step_args=(--model resnet50 --batch 256 --steps 20 --warmup 2)
  tests_args=() xdist_n=4
  kernels_args=(--implicit-only --warmup 3 --iters 20) square_args=(--warmup 3 --iters 20)
  dws_args=(--warmup 3 --iters 20)
  rest_args=(--batch 256 --steps 10 --warmup 2) ts_args=(--repeats 10 --block "steps period 1")
  rest_model=resnet50 layers_args=(--ops resnet50 --ops-kernels 3 --repeats 10 --block layers)
  mobilenet_variants="bf16,ui8-bf16 never" t_rest=${T_REST:-90}
  fusion_args=(--backend pallas) t_fusions=${T_FUSIONS:-60}
fi

# -- 0. environment and smoke test -------------------------------------------
if [[ $phases == *,0,* ]]; then
  say "== phase 0: environment, smoke test of every kernel config"
  { date -u; command -v nvidia-smi >/dev/null &&
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    timeout -k 5 15 "$py" -c "import jax, jaxlib, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  } >"$logd/env.log" 2>&1
  head -12 "$logd/env.log" | tee -a "$summary"
  if [[ ${INT8JAX_IMPLICIT_GEMM:-1} == 0 ]]; then
    say "INT8JAX_IMPLICIT_GEMM=0 set by the caller: implicit-GEMM convs off in every phase"
  fi
  run smoke "$t_smoke" "$py" benchmarks/gpu_smoke.py --json "$outd/smoke.json" \
    "${smoke_args[@]}" ${SMOKE_ARGS:-}
  rc=$?
  show smoke "^smoke" 30
  gate=$("$py" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['implicit_ok']))" \
         "$outd/smoke.json" 2>/dev/null)
  if [[ $gate != 1 ]]; then
    export INT8JAX_IMPLICIT_GEMM=0
    say "GATE: an implicit-GEMM conv kernel failed, hung or was not reached (smoke rc=$rc);" \
        "phases 1-4 run with INT8JAX_IMPLICIT_GEMM=0 (im2col / int8_matmul for every conv)"
  else
    say "GATE: every conv/wgrad config passed; implicit-GEMM convs stay on"
  fi
  direct_gate=$("$py" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['direct_ok']))" \
                "$outd/smoke.json" 2>/dev/null)
  if [[ $direct_gate == 1 ]]; then
    say "GATE: every direct-addressing conv config passed; phase 1 times INT8JAX_DIRECT_CONV=1 too"
  else
    say "GATE: a direct-addressing conv config failed, hung or was not reached;" \
        "no INT8JAX_DIRECT_CONV=1 row"
  fi
  ws_gate=$("$py" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['ws_ok']))" \
            "$outd/smoke.json" 2>/dev/null)
  if [[ $ws_gate == 1 ]]; then
    say "GATE: every int8_matmul_ws config passed; phases 2-3 test and time it"
  else
    say "GATE: an int8_matmul_ws config failed, hung or was not reached; not tested or timed"
  fi
  direct_ws_gate=$("$py" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['direct_ws_ok']))" \
                   "$outd/smoke.json" 2>/dev/null)
  if [[ $direct_ws_gate == 1 ]]; then
    say "GATE: every conv_direct_wgrad_ws config passed; phases 2-3 test and time it"
  else
    say "GATE: a conv_direct_wgrad_ws config failed, hung or was not reached; not tested or timed"
  fi
  # The traffic model's multi-output-fusion assumption, on the direct route (compile
  # only, nothing runs): how many fusions read the float x and dy (1 each is the model).
  run fusions "$t_fusions" env INT8JAX_DIRECT_CONV=1 "$py" benchmarks/fusion_check.py \
    "${fusion_args[@]}" --out "$logd/fusions.json" --hlo "$logd/fusions_hlo.txt"
  show fusions "^fusion_check" 2
  archive
fi

# -- 1. ResNet-50 step: bf16 vs UI8 (bf16 float parts), non-measuring --------
if [[ $phases == *,1,* ]]; then
  say "== phase 1: training step, bf16 vs ui8-bf16 never (INT8JAX_IMPLICIT_GEMM=${INT8JAX_IMPLICIT_GEMM:-1})"
  run step "${T_STEP:-220}" "$py" benchmarks/step_time.py "${step_args[@]}" \
    --variants "bf16,ui8-bf16 never" --out "$outd/step.md"
  show step "^\| (bf16|ui8)| vs bf16|Error|error" 10
  archive
  if [[ ${direct_gate:-0} == 1 ]]; then
    run step_direct "${T_DIRECT:-100}" env INT8JAX_DIRECT_CONV=1 "$py" benchmarks/step_time.py \
      "${direct_step_args[@]}" --variants "ui8-bf16 never" --out "$outd/step.md"
    show step_direct "^\| ui8|direct|Error|error" 6
    archive
  else
    say "-- step_direct: skipped (direct_ok is not true in smoke.json, or phase 0 did not run)"
  fi
fi

# -- 2. GPU tests, verbose, per-test timeout --------------------------------
if [[ $phases == *,2,* ]]; then
  say "== phase 2: GPU tests (-m gpu -v)"
  targs=(-m gpu -v -p no:cacheprovider -rfE "${tests_args[@]}")
  "$py" -c "import pytest_timeout" 2>/dev/null && targs+=(--timeout 60) ||
    say "pytest-timeout missing (not in .whl/?): no per-test limit, only the phase's"
  "$py" -c "import xdist" 2>/dev/null && targs+=(-n "$xdist_n") ||
    say "pytest-xdist missing: tests run in one process"
  tfiles=(tests/test_int8_conv_kernels.py tests/test_pallas_backend.py tests/test_pallas_kernels.py)
  [[ ${ws_gate:-0} == 1 ]] && tfiles+=(tests/test_int8_matmul_ws.py)
  [[ ${direct_ws_gate:-0} == 1 ]] && tfiles+=(tests/test_conv_direct_wgrad_ws.py)
  run tests "${T_TESTS:-80}" "$py" -m pytest "${targs[@]}" "${tfiles[@]}"
  show tests "(FAILED|ERROR|Timeout)|passed|failed|skipped" 25
  archive
fi

# -- 3. kernel / layer table: 11 layers, fwd / dgrad / wgrad separately -----
if [[ $phases == *,3,* ]]; then
  say "== phase 3: implicit-GEMM kernels vs int8_matmul vs bf16, 11 layers"
  ws_args=()
  [[ ${ws_gate:-0} == 1 ]] && ws_args=(--with-ws)
  run kernels "${T_KERNELS:-80}" "$py" benchmarks/kernels.py "${kernels_args[@]}" "${ws_args[@]}"
  show kernels "^\| l|failures|FAILED" 14
  archive
  if [[ ${ws_gate:-0} == 1 ]]; then
    run kernels_ws "${T_KERNELS_WS:-45}" "$py" benchmarks/kernels.py --square-only --with-ws \
      "${square_args[@]}"
    show kernels_ws "^\| square|needs a Hopper|FAILED|failed" 4
    archive
  else
    say "-- kernels_ws: skipped (ws_ok is not true in smoke.json, or phase 0 did not run)"
  fi
  if [[ ${direct_ws_gate:-0} == 1 ]]; then
    [[ ${direct_gate:-0} == 1 ]] || dws_args+=(--no-direct-baseline)
    run kernels_dws "${T_KERNELS_DWS:-30}" "$py" benchmarks/kernels.py --direct-wgrad-only \
      "${dws_args[@]}"
    show kernels_dws "^\| conv|failures|FAILED|failed" 4
    archive
  else
    say "-- kernels_dws: skipped (direct_ws_ok is not true in smoke.json, or phase 0 did not run)"
  fi
fi

# -- 4. the rest ---------------------------------------------------------------
if [[ $phases == *,4,* ]]; then
  say "== phase 4: MobileNetV2, float32 parts, period 1, XLA:GPU repro"
  run rest_mobilenet "$t_rest" "$py" benchmarks/step_time.py --model mobilenet_v2 \
    "${rest_args[@]}" --variants "$mobilenet_variants" --out "$outd/step.md"
  run rest_float32 "$t_rest" "$py" benchmarks/step_time.py --model "$rest_model" \
    "${rest_args[@]}" --variants "float32,ui8 never" --out "$outd/step.md"
  show rest_mobilenet "^\| (bf16|ui8)| vs " 6
  show rest_float32 "^\| (float32|ui8)| vs " 6
  archive
  run rest_period1 "$t_rest" "$py" benchmarks/train_step.py --models "$rest_model" --ops "" \
    "${ts_args[@]}" --step-variants "ui8-bf16 period 1"
  show rest_period1 " step: |FAILED" 4
  archive
  run repro 40 "$py" benchmarks/xla_gpu_dgrad_repro.py --with-int8jax \
    --out "$outd/xla_gpu_dgrad_repro.json"
  show repro "verdict|WRONG|x2|differ|error" 8
  archive
  run rest_layers "$t_rest" "$py" benchmarks/train_step.py --models "" "${layers_args[@]}"
  show rest_layers "^  resnet|FAILED" 8
  archive
fi

say "== done in $((SECONDS - start))s; INT8JAX_IMPLICIT_GEMM=${INT8JAX_IMPLICIT_GEMM:-1}"
archive
n=$(find "$outd" -maxdepth 1 -type f | wc -l)
say "OUTDIR $outd: $n files ($(cd "$outd" && ls | tr '\n' ' '))"
(( n <= 7 )) || say "WARNING: more than 7 files in OUTDIR; a GPU run brings back 8 at most"
rm -rf "$logd"
