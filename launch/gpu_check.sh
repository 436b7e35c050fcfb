#!/usr/bin/env bash
# The GPU path of slmjax in one short run: a two-rung bf16 sweep of each architecture, the MoE layer benchmark
# at accelerator sizes, and the model / dispatch / training tests on the GPU. Each stage has a time limit and
# writes its log into OUT (default /tmp/slmjax-gpu-check) as it goes, so a cut-short run still says something.
#   launch/gpu_check.sh                 # ~8 min on one H200 (most of it compiling)
#   SWEEP_S=300 TESTS_S=600 launch/gpu_check.sh
# Needs slmjax's packages in $PYTHON (default python3) with a CUDA jaxlib; run from anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-/tmp/slmjax-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$out/env.log"
sweep="--ladder=${LADDER:-256x4,512x8} --tokens=${TOKENS:-3000000} --seeds=0 --batch_size=32 --seq_len=256
       --dtype=bfloat16 --out=$out/runs --noplot"
for arch in "--arch=dense" "--arch=moe --experts=8 --k=2"; do
  timeout "${SWEEP_S:-180}" "$python" experiments/sweep.py $arch $sweep; echo "sweep $arch: exit $?"
done 2>&1 | tee "$out/sweep.log"
bench=(timeout "${BENCH_S:-180}" "$python" experiments/bench_moe.py --group_sizes=512 --tokens=65536 --d_model=1024
       --dtype=bfloat16 --nomodel --repeats=5 --inner=5 --max_ratio=4)
"${bench[@]}" --settings=coarse,fine --impls=einsum,gather,ragged 2>&1 | tee "$out/bench_moe.log"
# A dropless candidate for GPUs, where ragged_dot is E times the work: gather at capacity factor E / k never drops
# (capacity = the group), and its tail runs on the busiest expert's bucket only.
"${bench[@]}" --settings=coarse --impls=gather --capacity_factor=4 2>&1 | tee "$out/bench_moe_gather_dropless.log"
# f32 tests compare implementations to 1e-5: without 'highest' XLA:GPU runs f32 matmuls in TF32. -v names each
# failure as it happens, so a run the time limit cuts still says which tests failed.
XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_S:-300}" "$python" -m pytest -v -o addopts= \
  -n "${WORKERS:-8}" --dist loadfile -rfE tests/test_dispatch.py tests/test_moe.py tests/test_model.py \
  tests/test_layers.py tests/test_router.py tests/test_train.py tests/test_generate.py tests/test_checkpoint.py \
  2>&1 | tee "$out/tests.log" | grep -E "FAILED|ERROR|passed|failed"
