"""The local multi-process launcher: 2 processes x 2 CPU devices train together, agree, and resume (a dense model,
data parallel: its launch takes 19 s here against 30 s for a small MoE, and the expert-parallel sweep below runs
an MoE across the processes); an expert-parallel sweep on one mesh across them."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def launch(out, steps):
  env = {**os.environ, 'PYTHON': sys.executable}
  flags = ['--arch=dense', '--d_model=32', '--n_layers=2', f'--steps={steps}', '--warmup=1',
           '--batch_size=8', '--seq_len=32', '--mesh=data:4', f'--out={out}', '--checkpoint_every=2',
           '--log_every=2', '--eval_every=0', '--mfu=false']
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'local_cpu.sh'), '2', '2', 'experiments/train.py', *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = [pathlib.Path(f'{out}.logs/process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-2000:] + logs[1][-2000:]
  return logs


def final_losses(logs):
  return [re.search(r'process \d/2: final train loss (\S+)', log).group(1) for log in logs]


@pytest.mark.slow
def test_two_processes_agree_and_resume_from_their_checkpoint(tmp_path):
  out = tmp_path / 'run'
  logs = launch(out, steps=4)
  first = final_losses(logs)
  assert first[0] == first[1]
  assert (out / 'checkpoints' / '4').is_dir() and (out / 'summary.json').exists()
  assert sum(1 for _ in open(out / 'metrics.jsonl')) == 2  # steps 2 and 4, written by process 0 only
  logs = launch(out, steps=6)
  assert 'from step 4' in logs[0]
  again = final_losses(logs)
  assert again[0] == again[1] and again[0] != first[0]
  assert (out / 'checkpoints' / '6').is_dir() and sum(1 for _ in open(out / 'metrics.jsonl')) == 3


@pytest.mark.slow
def test_expert_parallel_sweep_across_two_processes(tmp_path):
  """launch/ep_sweep.sh: one mesh expert:4 over 2 processes x 2 devices, so the all-to-all crosses processes."""
  out = tmp_path / 'ep'
  flags = ['--experts=4', '--k=2', '--ladder=16x1', '--seeds=0', '--tokens=1024', '--batch_size=8', '--seq_len=32',
           '--warmup=1', '--eval_every=0', '--eval_batches=1', '--plot=false', '--nodecode_cost', '--nomfu', f'--out={out}']
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'ep_sweep.sh'), '2', '2', '4', *flags], cwd=ROOT,
                          env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
  logs = [pathlib.Path(f'{out}.logs/process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-2000:] + logs[1][-2000:]
  rows = [json.loads(line) for line in open(out / 'results.jsonl')]
  assert len(rows) == 1 and rows[0]['mesh'] == {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  assert rows[0]['tokens'] == 1024 and math.isfinite(rows[0]['train_loss'])
  assert rows[0]['mfu'] is None and 'matmul peak' not in logs[0]  # --nomfu: no peak timed (7 s a process here)
