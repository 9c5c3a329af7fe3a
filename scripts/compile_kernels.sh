#!/usr/bin/env bash
# Compile every Mosaic GPU kernel of this checkout to PTX/SASS on a CPU-only
# machine, before any GPU is lent (Mosaic GPU's own pipeline, ptxas included,
# with a stand-in libcuda: ../shared/tools/mosaic-offline, README there):
#
#   bash scripts/compile_kernels.sh [OUTDIR]      # default /tmp/int8jax_sass
#
# Targets: `kernels` (every config of CONV_CONFIGS, WGRAD_CONFIGS and
# LIBRARY_CONFIGS on six ResNet-50 layers, and int8_matmul; dump.py's two
# quantize_kmajor cases lower no kernel since that kernel's removal), `direct`
# (pallas_kernels.conv_direct's forward and dgrad -- stride 2: a kernel per
# output phase -- and conv_direct_wgrad on the same layers, lowered by
# scripts/dump_conv_direct.py; `kernels` implies it), `ws`
# (pallas_kernels.int8_matmul_ws on 4096^3, 8192^3 and the conv-shaped GEMMs,
# lowered by scripts/dump_int8_matmul_ws.py; `kernels` implies it too),
# `direct_ws` (pallas_kernels.conv_direct_wgrad_ws, the persistent,
# warp-specialised direct weight gradient, on the ResNet-50 layers, lowered by
# scripts/dump_conv_direct_wgrad_ws.py; `kernels` implies it too) and
# `resnet50` (the ResNet-50 batch-256 forward+backward of a ui8-bf16
# non-measuring training step). Writes OUTDIR/{kernels,direct,ws,direct_ws,resnet50}/census.txt
# and prints the census summaries. Exit status 1 on any lowering failure,
# ptxas failure or register spill (a bug to fix before a GPU window).
#
# Environment: MOSAIC_OFFLINE (the tool's folder; default
# ../shared/tools/mosaic-offline from the repository root), JOBS (kernels
# compiled at once, default 1: the CPU machines are shared), TARGETS
# (default "kernels resnet50"), BATCH (default 256).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
tool=${MOSAIC_OFFLINE:-$root/../shared/tools/mosaic-offline}
outd=${1:-/tmp/int8jax_sass}
jobs=${JOBS:-1}
targets=${TARGETS:-kernels resnet50}
# `kernels` implies `direct`, `ws` and `direct_ws` (once each), right after it
if [[ " $targets " == *" kernels "* ]]; then
  targets=$(echo " $targets " | sed -e 's/ direct / /g' -e 's/ ws / /g' -e 's/ direct_ws / /g' \
                                    -e 's/ kernels / kernels direct ws direct_ws /')
fi
if [[ ! -f $tool/dump.py || ! -f $tool/compile.py || ! -f $tool/setup.sh ]]; then
  echo "compile_kernels.sh: mosaic-offline not found at '$tool' (no dump.py/compile.py/setup.sh);" \
    "set MOSAIC_OFFLINE=/path/to/mosaic-offline" >&2
  exit 2
fi
# setup.sh is idempotent (1 s when the cache is built) and prints the cache folder.
bash "$tool/setup.sh" >/tmp/mosaic-offline-setup.log 2>&1 || {
  echo "compile_kernels.sh: $tool/setup.sh failed; see /tmp/mosaic-offline-setup.log" >&2; exit 2; }
py=${MOSAIC_OFFLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mosaic-offline}/venv/bin/python
[[ -x $py ]] || { echo "compile_kernels.sh: no python at $py after setup.sh" >&2; exit 2; }
mkdir -p "$outd"
rc=0
for t in $targets; do
  echo "== $t: dump (lower for CUDA) and compile, --jobs $jobs"
  if [[ $t == direct ]]; then
    dump=("$root/scripts/dump_conv_direct.py" --tool "$tool")
  elif [[ $t == ws ]]; then
    dump=("$root/scripts/dump_int8_matmul_ws.py" --tool "$tool")
  elif [[ $t == direct_ws ]]; then
    dump=("$root/scripts/dump_conv_direct_wgrad_ws.py" --tool "$tool")
  else
    dump=(dump.py "$t" --project "$root")
  fi
  (cd "$tool" && "$py" "${dump[@]}" --out "$outd/$t" --batch "${BATCH:-256}") \
    >"$outd/$t.dump.log" 2>&1 || { echo "$t: ${dump[0]##*/} FAILED (tail of $outd/$t.dump.log):";
                                   tail -5 "$outd/$t.dump.log"; rc=1; continue; }
  (cd "$tool" && "$py" compile.py "$outd/$t" --jobs "$jobs") >"$outd/$t.compile.log" 2>&1 || rc=1
  # census.txt: one row per kernel, then the summary line and one line per config
  awk '/^[0-9]+ kernels: /{p=1} p' "$outd/$t/census.txt" 2>/dev/null
  grep -E " (SPILL|FAIL)$" "$outd/$t/census.txt" 2>/dev/null | head -10
done
echo "census files: $outd/*/census.txt; exit status $rc"
exit $rc
