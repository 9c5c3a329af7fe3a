#!/usr/bin/env bash
# float32 vs UI8 RetinaNet on the generated MNIST-detection set, 3 seeds each
# (docs/detection.md). Usage, from the repository root:
#   bash examples/detection/benchmark.sh [DATA_DIR] [RUNS_DIR]
# Runs are sequential (modes interleaved per seed, so both see similar machine
# load); an interrupted benchmark resumes where it stopped (each run resumes
# from its checkpoints; finished runs, which have a summary.json, are skipped).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${1:-runs/detection/data}
RUNS=${2:-runs/detection}
[ -f "$DATA/annotations/instances_val.json" ] || \
  $PY -m examples.detection.make_dataset --out "$DATA" --seed 0
mkdir -p "$RUNS"
COMMON=(--data-dir "$DATA" --optimizer adamw --lr 0.002 --weight-decay 0.0001
        --warmup-epochs 0.5 --epochs 10 --batch-size 32 --period 10
        --eval-every-epochs 2.5 --log-every 25 --no-progress)
for seed in 0 1 2; do
  for mode in float32 ui8; do
    dir="$RUNS/${mode}_s${seed}"
    if [ -f "$dir/summary.json" ]; then echo "done: $dir"; continue; fi
    nice -n 10 $PY -m examples.detection.train "${COMMON[@]}" --mode "$mode" --seed "$seed" \
      --workdir "$dir" 2>&1 | tee -a "$dir.log" | grep -E "^SUMMARY|resumed|stopping"
  done
done
$PY -m examples.detection.report "$RUNS"/*_s? --plot docs/figures/detection_loss.png \
  --markdown docs/detection_results.md
