#!/usr/bin/env bash
# A training step of the library at commit REV vs the working tree, interleaved.
#   bash benchmarks/compare_commits.sh REV [ROUNDS] [-- step_ab.py options]
# e.g. bash benchmarks/compare_commits.sh 0a9280c 3 -- --model mobilenet_v2 --size 224 --batch 8
# Each round runs benchmarks/step_ab.py (this tree's copy) once with REV's
# library first on PYTHONPATH, then once with this tree's; prints every
# JSON line and the per-variant medians over rounds and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: compare_commits.sh REV [ROUNDS] [-- step_ab.py options]}; shift
ROUNDS=3
if [ $# -gt 0 ] && [ "$1" != "--" ]; then ROUNDS=$1; shift; fi
[ "${1:-}" = "--" ] && shift
PY=${PY:-.venv/bin/python}
OLD=$(mktemp -d /tmp/int8jax_rev.XXXXXX)
trap 'git worktree remove --force "$OLD" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$OLD" "$REV" >/dev/null
OUT=$(mktemp /tmp/int8jax_ab.XXXXXX.jsonl)
for r in $(seq "$ROUNDS"); do
  PYTHONPATH="$OLD" $PY benchmarks/step_ab.py "$@" | sed "s/^/{\"tree\": \"$REV\", \"r\": /; s/^\(.*\"r\": \){/\1$r, /" | tee -a "$OUT"
  PYTHONPATH="$PWD" $PY benchmarks/step_ab.py "$@" | sed "s/^/{\"tree\": \"working tree\", \"r\": /; s/^\(.*\"r\": \){/\1$r, /" | tee -a "$OUT"
done
$PY - "$OUT" "$REV" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rev = sys.argv[2]
for tree in (rev, "working tree"):
  libs = {r["library"] for r in rows if r["tree"] == tree}
  print(f"{tree}: library {', '.join(sorted(libs))}")
print(f"| variant | {rev} ms | working tree ms | ratio |")
print("| --- | ---: | ---: | ---: |")
for k in rows[0]["ms"]:
  a = statistics.median(r["ms"][k] for r in rows if r["tree"] == rev)
  b = statistics.median(r["ms"][k] for r in rows if r["tree"] == "working tree")
  print(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
PYEOF
