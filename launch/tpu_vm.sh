#!/usr/bin/env bash
# Create a TPU VM slice, install slmjax on every worker, and run a sweep on all of them at once.
# JAX detects the slice's hosts itself (jax.distributed.initialize() with no arguments; slmjax calls it when
# TPU_WORKER_HOSTNAMES lists several hosts). Only process 0 writes results and plots.
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE [SWEEP FLAGS...]
#   launch/tpu_vm.sh slmjax-v5e us-west4-a v5litepod-16 --arch=moe --experts=64 --k=8 --ladder=gpu \
#       --mesh=data:-1,expert:8 --out=gs-fuse-or-nfs/runs
# Results must go to storage every worker can write (a GCS FUSE mount or NFS), since checkpoints are written by
# all processes. Delete the VM afterwards: gcloud compute tpus tpu-vm delete NAME --zone=ZONE
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE [SWEEP FLAGS...]" >&2
  exit 2
fi
name=$1; zone=$2; type=$3; shift 3
repo=${REPO:-$(git config --get remote.origin.url)}
version=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5-lite}
gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1 ||
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" --version="$version"
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }
ssh_all "test -d slmjax || git clone $repo slmjax; cd slmjax && git pull --ff-only &&
  python3 -m venv .venv && .venv/bin/pip install -q -U 'jax[tpu]' && .venv/bin/pip install -q -e ."
ssh_all "cd slmjax && .venv/bin/python experiments/sweep.py $(printf '%q ' "$@")"
