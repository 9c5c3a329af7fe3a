#!/usr/bin/env bash
# Start one multi-process training job as N processes on this machine, to try
# multi-process training (and test it) without a cluster:
#
#   bash scripts/launch_local.sh N -m examples.mnist_flax --mode ui8 --workdir runs/mh
#
# (the examples are modules: `-m examples.<name>`; any other SCRIPT.py works too)
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, JAX_NUM_PROCESSES=N
# and JAX_PROCESS_ID=i (examples/distributed.py reads them), and runs on the CPU
# unless JAX_PLATFORMS says otherwise. Environment:
#   PORT                 coordinator port (default: a free one)
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 1)
#   LOGDIR               process i's output also goes to LOGDIR/process_i.log
#                        (default: a new temporary folder, printed)
#   GRACE                seconds the others get to finish after one process
#                        failed before they are killed (default 30)
#   PYTHON               interpreter (default .venv/bin/python, else python3)
# Process 0's output is shown here; the others' only in their logs.
# SIGINT / SIGTERM to this script reach every process as SIGTERM (they
# checkpoint at the same step and exit 75). Exit status: 0 if every process succeeded, else the
# first non-zero status (75: stopped by a signal, run the same command again
# to resume).
set -u
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N SCRIPT.py|-m MODULE [ARGS...]   (N >= 1 processes; got '${1:-}')" >&2
  exit 2
fi
n=$1; shift
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
port=${PORT:-$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-$(mktemp -d -t int8jax_launch.XXXXXX)}
mkdir -p "$logdir"
per=${DEVICES_PER_PROCESS:-1}
grace=${GRACE:-30}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} JAX_COORDINATOR_ADDRESS=127.0.0.1:$port \
  JAX_NUM_PROCESSES=$n PYTHONUNBUFFERED=1
if [ "$per" != 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per"
fi
echo "launch_local: $n processes x $per device(s), coordinator 127.0.0.1:$port, logs in $logdir" >&2
pids=()
for ((i = 0; i < n; i++)); do
  if [ "$i" = 0 ]; then
    # tee ignores Ctrl-C: it must outlive process 0's checkpoint-and-exit.
    JAX_PROCESS_ID=$i "$py" "$@" > >(trap '' INT TERM; exec tee "$logdir/process_$i.log") 2>&1 &
  else
    JAX_PROCESS_ID=$i "$py" "$@" >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# A Ctrl-C reaches every process from the terminal too; passing SIGTERM (not a
# second SIGINT, which would interrupt at once) makes each stop at the agreed step.
forward() {
  echo "launch_local: $1: passing SIGTERM to every process" >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
status=0; left=$n; deadline=""
declare -A done_
while [ "$left" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    [ -n "${done_[$i]:-}" ] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"; rc=$?
      done_[$i]=1; left=$((left - 1))
      if [ "$rc" != 0 ]; then
        echo "launch_local: process $i exited with status $rc (log: $logdir/process_$i.log)" >&2
        if [ "$status" = 0 ]; then status=$rc; fi
        if [ -z "$deadline" ] && [ "$rc" != 75 ]; then deadline=$((SECONDS + grace)); fi
      fi
    fi
  done
  if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ] && [ "$left" -gt 0 ]; then
    echo "launch_local: a process failed; killing the $left still running after ${grace} s" >&2
    for i in "${!pids[@]}"; do
      [ -z "${done_[$i]:-}" ] && kill -KILL "${pids[$i]}" 2>/dev/null
    done
    deadline=""
  fi
  [ "$left" -gt 0 ] && sleep 0.2
done
exit "$status"
