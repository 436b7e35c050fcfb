"""experiments/bench_train.py and bench_moe.py at toy sizes: the JSON rows the issues ask for, figures that are
consistent with each other and with the library's counting, and one-line errors on bad flags."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from slmjax import counting
from slmjax.config import ModelConfig

EXPERIMENTS = pathlib.Path(__file__).parent.parent / 'experiments'
PEER_PYTHON = pathlib.Path(os.path.expanduser('~/.hfpeer/bin/python'))


def run(script, *flags):
  return subprocess.run([sys.executable, str(EXPERIMENTS / script), *flags], capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow
def test_bench_train_rows():
  tiny = ('--models=flags', '--arch=moe', '--experts=4', '--k=2', '--d_model=32', '--n_layers=1', '--n_heads=2',
          '--batch_size=2', '--seq_len=16', '--steps=2', '--warmup=1', '--rounds=2', '--json')
  result = run('bench_train.py', *tiny)
  assert result.returncode == 0, result.stderr
  row, = json.loads(result.stdout)
  cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=16, n_experts=4, top_k=2, capacity_factor=None)
  counts = counting.analytic_counts(cfg)
  assert (row['total_params'], row['active_params']) == (counts.total, counts.active)
  assert row['flops_per_step'] == counting.train_flops_per_token(cfg, 16) * 2 * 16
  assert row['tokens_per_s'] == pytest.approx(2 * 16 / row['step_time_s'])
  assert row['achieved_gflops'] == pytest.approx(row['flops_per_step'] / row['step_time_s'] / 1e9)
  assert row['mfu'] == pytest.approx(row['achieved_gflops'] / row['peak_gflops'])
  assert row['dispatch'] == 'ragged' and row['drop_fraction'] == 0.0  # dropless by default, as the peer
  assert len(row['step_time_s_rounds']) == 2 and row['step_time_s'] == min(row['step_time_s_rounds'])


def test_bench_train_rejects_unknown_models():
  result = run('bench_train.py', '--models=gpt5')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "bench_train.py: error: --models: unknown model 'gpt5'; known: llama, mixtral-512, mixtral-1024, flags"]


def test_bench_train_checks_the_peer_before_timing():
  result = run('bench_train.py', '--peer', '--peer_python=/nonexistent/python')
  assert result.returncode == 2 and '# round' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('bench_train.py: error: --peer: no peer python at')


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason='no peer venv at ~/.hfpeer (BUILD.md, Benchmarks)')
def test_bench_train_bf16_against_the_peers_autocast():
  result = run('bench_train.py', '--peer', '--dtype=bfloat16', '--models=llama', '--batch_size=2', '--seq_len=16',
               '--steps=1', '--warmup=1', '--json')
  assert result.returncode == 0, result.stderr
  row, = json.loads(result.stdout)
  assert row['dtype'] == 'bfloat16' and row['peer_autocast'] == 'bfloat16'
  assert row['peer_flops_per_step'] == row['flops_per_step']  # the same model shapes, counted the same way
  assert row['ratio_to_peer'] == pytest.approx(row['tokens_per_s'] / row['peer_tokens_per_s'])


def test_bench_train_rejects_a_dtype_without_a_peer_mode():
  result = run('bench_train.py', '--peer', '--dtype=float16', f'--peer_python={sys.executable}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'bench_train.py: error: --peer: no peer mode for --dtype=float16; use one of float32, bfloat16')


def test_bench_train_rejects_unknown_matmuls():
  result = run('bench_train.py', '--matmuls=xla,cublas')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "bench_train.py: error: --matmuls: unknown matmul 'cublas'; known: auto, xla, mkl, onednn"]


@pytest.mark.parametrize('flags,message', [
    (('--rounds=0',), '--rounds=0 and --steps=10 must be >= 1, --warmup=3 >= 0'),
    (('--models=',), '--models is empty: name some of llama, mixtral-512, mixtral-1024, flags'),
    (('--d_model=64', '--models=llama'), '--d_model describes a model only with --models=flags; the peer models are '
                                         'fixed'),
])
def test_bench_train_rejects_what_it_cannot_time(flags, message):
  result = run('bench_train.py', *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'bench_train.py: error: {message}']


@pytest.mark.parametrize('flags,message', [
    (('--settings=', '--nomodel'), 'nothing to time: give --settings and --impls, or --model'),
    (('--tokens=0',), '--tokens=0 must be positive'),
    (('--tokens=12', '--settings=fine'), "--tokens=12: setting 'fine' needs tokens * top_k divisible by its 64 "
                                         'experts (the balanced row gives each an equal share)'),
    (('--impls=alltoall',), "--impls: unknown implementation 'alltoall'; this benchmark times einsum, gather, "
                            'ragged, dense'),
])
def test_bench_moe_rejects_what_it_cannot_time(flags, message):
  result = run('bench_moe.py', *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'bench_moe.py: error: {message}']


@pytest.mark.slow
def test_bench_moe_rows():
  result = run('bench_moe.py', '--settings=coarse', '--impls=gather,ragged', '--group_sizes=32', '--tokens=64',
               '--d_model=16', '--repeats=2', '--inner=1', '--nomodel', '--matmul=onednn', '--json')
  assert result.returncode == 0, result.stderr
  rows = json.loads(result.stdout)
  assert [r['impl'] for r in rows] == ['DenseFFN', 'balanced', 'gather', 'ragged']
  assert {r['matmul'] for r in rows} == {'onednn'}  # the dense baseline's GEMMs too (flat_dense_grad_fn)
  for r in rows:
    assert {'impl', 'tokens', 'd_model', 'd_expert', 'n_experts', 'top_k', 'capacity_factor', 'time_s',
            'dense_time_s', 'ratio'} <= set(r)
    assert (r['tokens'], r['d_model'], r['n_experts'], r['top_k'], r['d_expert']) == (64, 16, 8, 2, 512)
    assert r['time_s'] > 0 and r['ratio'] > 0
  assert rows[3]['drop_fraction'] == 0.0  # ragged never drops


@pytest.mark.slow
def test_bench_moe_ladder_times_each_given_model_impl_dropless_too():
  result = run('bench_moe.py', '--settings=', '--model_ladder=32x1', '--model_seq_len=16', '--model_batch=2',
               '--repeats=1', '--model_impls=dense', '--json')
  assert result.returncode == 0, result.stderr
  rows = json.loads(result.stdout)
  # the sweep's pair (dropless: ragged; gather at the capacity factor), then --model_impls dropless
  assert [(r['impl'], r['capacity_factor']) for r in rows] == [('ragged', None), ('gather', 1.25), ('dense', None)]
  assert all(r['ratio'] > 0 and r['d_model'] == 32 for r in rows)


@pytest.mark.slow
def test_bench_infer_quick_rows_and_plot(tmp_path):
  result = run('bench_infer.py', '--quick', f'--out={tmp_path}', '--json')
  assert result.returncode == 0, result.stderr
  rows = json.loads(result.stdout)
  assert [(r['model'], r['batch']) for r in rows] == [(m, b) for m in ('llama', 'mixtral-512', 'llama-4096')
                                                      for b in (1, 4)]
  for r in rows:
    assert r['context'] == 8 and r['new_tokens'] == 4
    assert r['weight_bytes'] == r['weight_bytes_computed'] and r['kv_cache_bytes'] == r['kv_cache_bytes_computed']
    assert r['decode_tokens_per_s'] == pytest.approx(r['batch'] * 4 / r['decode_s'])
    assert r['decode_peak_bytes'] >= r['weight_bytes'] + r['kv_cache_bytes']
  moe, dense = rows[2], rows[0]
  assert moe['total_params'] > 1.5 * dense['total_params']
  assert abs(moe['active_params'] / dense['active_params'] - 1) < 0.02  # matched active (the router differs)
  assert (tmp_path / 'decode.png').stat().st_size > 10_000
  assert json.loads((tmp_path / 'decode_rows.json').read_text())['rows'] == rows


def test_bench_infer_peer_without_its_venv_fails_in_one_line():
  result = run('bench_infer.py', '--peer', '--peer_python=/nonexistent/python')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'bench_infer.py: error: --peer: no peer python at /nonexistent/python; create the venv with `python3 -m venv '
      '~/.hfpeer && ~/.hfpeer/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors` '
      '(../shared/tools/README.md), or give --peer_python']
