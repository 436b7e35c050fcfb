#!/usr/bin/env bash
# Start N processes on this machine, each with D CPU devices, joined by jax.distributed over loopback (gloo).
# The same code path as a multi-host GPU/TPU job, testable on a laptop.
#   launch/local_cpu.sh N D SCRIPT [FLAGS...]
#   launch/local_cpu.sh 2 2 experiments/train.py --arch=moe --steps=20 --mesh=data:2,expert:2 --out=runs/mp
# Each process's output goes to <out>.logs/process_<i>.log (else /tmp/slmjax-local-PORT/); the script waits for all
# processes and exits non-zero if any failed.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS SCRIPT [FLAGS...]" >&2
  exit 2
fi
n=$1; d=$2; script=$3; shift 3
python=${PYTHON:-python3}
port=${PORT:-$((20000 + RANDOM % 20000))}
logdir=/tmp/slmjax-local-$port
for arg in "$@"; do case $arg in --out=*) logdir=${arg#--out=}.logs;; esac; done
mkdir -p "$logdir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d" \
    "$python" "$script" --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $logdir/process_$i.log" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "all $n processes finished; logs in $logdir"
exit $status
