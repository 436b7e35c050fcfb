"""A sweep directory written by an older slmjax (tests/fixtures/legacy_v1, see its README) still resumes: the
finished point is not redone, the interrupted one continues from its checkpoint and trains bit for bit as the
old code did (its held-out loss differs on purpose: evaluation is dropless now, see eval_capacity_factor)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'legacy_v1'
SCRIPT = pathlib.Path(__file__).parent.parent / 'experiments' / 'sweep.py'
# A bare environment (no user settings leak in), but the session's compile cache and XLA flags (conftest.py).
ENV = {'SLMJAX_HUGEPAGES': '0', 'PATH': '/usr/bin:/bin',
       **{k: os.environ[k] for k in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                                     'XLA_FLAGS') if k in os.environ}}
FLAGS = ['--ladder=16x1', '--batch_size=4', '--seq_len=32', '--tokens=1024', '--checkpoint_every=4',
         '--data=corpus.txt', '--out=runs', '--noplot', '--nomfu', '--nodecode_cost',
         '--seeds=0', '--capacity_factor=1.25']  # the sweep defaults of then (one seed, cf 1.25), not of today


def test_old_sweep_directory_resumes_bit_for_bit(tmp_path):
  work = tmp_path / 'legacy'
  shutil.copytree(FIXTURE, work)
  expected = json.loads((work / 'expected_moe_row.json').read_text())
  dense = subprocess.run([sys.executable, str(SCRIPT), '--arch=dense', *FLAGS], cwd=work, capture_output=True,
                         text=True, env=ENV)
  assert dense.returncode == 0, dense.stderr
  assert '1 already finished' in dense.stdout and '[point' not in dense.stdout  # the same run id: nothing redone
  moe = subprocess.run([sys.executable, str(SCRIPT), '--arch=moe', '--experts=4', '--k=2', *FLAGS], cwd=work,
                       capture_output=True, text=True, env=ENV)
  assert moe.returncode == 0, moe.stderr
  assert f'resuming runs/{expected["run_id"]} from step 4' in moe.stdout
  rows = [json.loads(line) for line in (work / 'runs' / 'results.jsonl').read_text().splitlines()]
  assert sorted(r['run_id'] for r in rows) == sorted(['dense-d16-l1-s0-eff295db', expected['run_id']])
  row = next(r for r in rows if r['run_id'] == expected['run_id'])
  # A few float32 ulps: XLA:CPU's threaded reductions may split work differently on a loaded machine (seen: 1 ulp).
  assert row['train_loss'] == pytest.approx(expected['train_loss'], rel=1e-6)
  assert row['eval_drop_fraction'] == 0.0 and abs(row['eval_loss'] - expected['eval_loss']) < 0.1
