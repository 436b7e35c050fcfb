#!/usr/bin/env bash
# An expert-parallel MoE sweep on one mesh across processes: the expert axis spans every process, so the
# all-to-all dispatch (slmjax/dispatch/alltoall.py) exchanges tokens between hosts, not only between local devices.
#   launch/ep_sweep.sh N D EP [SWEEP FLAGS...]      N processes x D devices, mesh data:N*D/EP,expert:EP
#   launch/ep_sweep.sh 2 4 8 --experts=8 --ladder=32x2,64x2 --tokens=200000 --out=runs/ep
# Locally the processes are started by launch/local_cpu.sh (CPU devices, gloo collectives over loopback). Under
# SLURM (SLURM_NTASKS > 1) srun starts them and JAX reads the ranks from SLURM; D is then the devices per task.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS EXPERT_PARALLEL [SWEEP FLAGS...]" >&2
  exit 2
fi
n=$1; d=$2; ep=$3; shift 3
if (( (n * d) % ep )); then
  echo "EXPERT_PARALLEL=$ep must divide the $((n * d)) devices ($n processes x $d)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
flags=(--arch=moe --mesh="data:$((n * d / ep)),expert:$ep" "$@")
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  exec srun "${PYTHON:-python3}" "$here/../experiments/sweep.py" "${flags[@]}"
fi
exec "$here/local_cpu.sh" "$n" "$d" "$here/../experiments/sweep.py" "${flags[@]}"
