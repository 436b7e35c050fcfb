"""Sweeps: matched ladders, budgets, resumable runs without duplicate rows, one-line errors on bad flags."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from slmjax import counting, results, sweep
from slmjax.config import ModelConfig
from slmjax.config import TrainConfig
from slmjax.train import train

SCRIPT = pathlib.Path(__file__).parent.parent / 'experiments' / 'sweep.py'


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  """Real text, small: a few modules of the running interpreter's standard library."""
  directory = tmp_path_factory.mktemp('corpus')
  for path in sorted((pathlib.Path(sysconfig.get_paths()['stdlib']) / 'json').glob('*.py')):
    shutil.copy(path, directory / path.name)
  return str(directory / '*.py')


def test_active_match_holds_active_params_and_total_match_holds_total():
  dense = sweep.ladder(ModelConfig(), sweep.parse_sizes('64x2,128x2'))
  active = sweep.ladder(ModelConfig(), sweep.parse_sizes('64x2,128x2'), n_experts=8, top_k=2, match='active')
  total = sweep.ladder(ModelConfig(), sweep.parse_sizes('64x2,128x2'), n_experts=8, top_k=2, match='total')
  for d, a, t in zip(dense, active, total):
    router = d.n_layers * d.d_model * 8
    dc, ac, tc = (counting.analytic_counts(c) for c in (d, a, t))
    assert ac.active - dc.active == router
    assert tc.total - dc.total == router
    assert ac.total > 3 * dc.total
    assert (a.d_model, a.n_layers, a.n_heads) == (d.d_model, d.n_layers, d.n_heads)


def test_default_ladder_spans_at_least_8x():
  sizes = [counting.analytic_counts(c).total for c in sweep.ladder(ModelConfig(), sweep.LADDERS['cpu'])]
  assert len(sizes) >= 4 and sizes == sorted(sizes) and sizes[-1] / sizes[0] >= 8


@pytest.mark.parametrize('spec, message', [('', 'is empty'), ('64', 'is not D x L'), ('64x0', 'is not D x L')])
def test_bad_ladders(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_sizes(spec)


def test_budget_validation_and_mixing_refused():
  with pytest.raises(ValueError, match='not both'):
    sweep.Budget(tokens=10, tokens_per_param=2.0)
  rows = [{'run_id': 'x', 'budget': {'tokens': 10, 'tokens_per_param': None}}]
  with pytest.raises(ValueError, match='holds results made with token budget'):
    sweep.check_budget(rows, sweep.Budget(tokens=20), 'runs')
  sweep.check_budget(rows, sweep.Budget(tokens=10), 'runs')


@pytest.mark.slow
def test_sweep_resumes_an_interrupted_point_and_never_duplicates_rows(corpus_dir, tmp_path):
  budget = sweep.Budget(tokens=6 * 4 * 32)
  base = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup=1, data=corpus_dir, eval_every=0, eval_batches=2,
                     checkpoint_every=2, log_every=2)
  configs = sweep.ladder(ModelConfig(max_seq_len=32), sweep.parse_sizes('16x1,32x1'), n_experts=4, top_k=2)
  points = [(cfg, base) for cfg in configs]
  # An interrupted sweep: the second point stopped at step 4 (its checkpoint is there), no row written yet.
  interrupted = tmp_path / sweep.run_id(*points[1])
  train(*points[1], interrupted, stop_at_step=4, log=None)
  lines = []
  rows = sweep.run_sweep(points, budget, str(tmp_path), log=lines.append)
  assert any('resuming' in line and 'from step 4' in line for line in lines)
  assert [r['tokens'] for r in rows] == [6 * 4 * 32] * 2
  for key in ('arch', 'n_experts', 'top_k', 'd_model', 'n_layers', 'total_params', 'active_params',
              'total_non_embedding_params', 'active_non_embedding_params', 'tokens', 'train_flops', 'train_loss',
              'eval_loss', 'step_time_s', 'tokens_per_s', 'mfu', 'peak_memory_bytes', 'weight_bytes', 'seed',
              'device', 'jax_version', 'model_config', 'decode_ms_per_token_b1', 'decode_ms_per_token_large',
              'decode_peak_bytes'):
    assert rows[0][key] is not None, key
  for row, cfg in zip(rows, configs):  # the rung's inference cost
    assert row['kv_cache_bytes_per_token'] == counting.kv_cache_bytes_per_token(cfg)
    assert row['decode_large_batch'] == 64 and row['decode_context'] == 32
    assert row['decode_peak_bytes'] >= row['weight_bytes'] + 64 * 32 * row['kv_cache_bytes_per_token']
  total = counting.analytic_counts(configs[0]).total
  assert rows[0]['total_params'] == total
  assert 8 * total <= rows[0]['optimizer_state_bytes'] <= 8 * total + 64  # AdamW's two moments (+ step counts)
  lines.clear()
  again = sweep.run_sweep(points, budget, str(tmp_path), log=lines.append)
  assert '2 already finished' in lines[0] and len(lines) == 1
  assert again == rows
  assert len(results.read_rows(tmp_path)) == 2


def test_mfu_is_against_the_peak_of_each_points_compute_dtype(corpus_dir, tmp_path, monkeypatch):
  """A bf16 point's MFU divides by a bf16 matmul peak, an f32 point's by an f32 one (on a GPU the f32 peak is a
  fraction of the bf16 one, so a shared f32 peak overstated bf16 MFU)."""
  fake_peaks = {'float32': 1e9, 'bfloat16': 4e9}
  measured = []
  monkeypatch.setattr(sweep.cost, 'matmul_peak_flops',
                      lambda dtype='float32': measured.append(dtype) or fake_peaks[dtype])
  base = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1, data=corpus_dir, eval_every=0, eval_batches=1,
                     checkpoint_every=2, log_every=2)
  points = [(ModelConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dtype=dtype), base)
            for dtype in ('bfloat16', 'float32')]
  rows = sweep.run_sweep(points, sweep.Budget(tokens=2 * 2 * 16), str(tmp_path), log=lambda line: None,
                         measure_inference=False)
  assert measured == ['bfloat16', 'float32']  # once per dtype
  assert 'decode_ms_per_token_b1' not in rows[0]  # measure_inference=False (--nodecode_cost): not measured
  assert [row['peak_flops_per_s'] for row in rows] == [4e9, 1e9]
  assert rows[0]['mfu'] == pytest.approx(rows[0]['achieved_flops_per_s'] / 4e9)


def test_a_gpu_sweep_with_dropless_moe_points_says_ragged_dot_is_slow_there():
  configs = sweep.ladder(ModelConfig(), sweep.parse_sizes('32x2,64x2'), n_experts=8, top_k=2)
  dropless = [cfg.replace(capacity_factor=None) for cfg in configs]
  assert '2 MoE point(s) train dropless' in sweep.ragged_on_gpu_notice(dropless, 'gpu')
  assert sweep.ragged_on_gpu_notice(dropless, 'cpu') is None  # grouped_ffn's row tiles there
  assert sweep.ragged_on_gpu_notice(configs, 'gpu') is None  # capacity factor 1.25: gather
  assert sweep.ragged_on_gpu_notice([ModelConfig()], 'gpu') is None  # dense


def test_run_ids_are_stable_across_releases():
  """Ids written by slmjax 0.1: a sweep directory from then must resume, so these may never change."""
  assert sweep.run_id(ModelConfig(), TrainConfig()) == 'dense-d128-l4-s0-55a5517a'
  moe = ModelConfig(n_experts=8, d_expert=256)
  assert sweep.run_id(moe, TrainConfig(seed=1, steps=977, warmup=97)) == 'moe8k2-d128-l4-s1-b1fa8608'
  assert sweep.FIRST_FIELDS[ModelConfig] <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_sweep_points_cap_warmup_at_a_tenth_of_each_budget():
  configs = sweep.ladder(ModelConfig(max_seq_len=32), sweep.parse_sizes('16x1,64x2'))
  fields = TrainConfig(seq_len=32, batch_size=4).to_dict()
  points = sweep.sweep_points(configs, sweep.Budget(tokens_per_param=20), fields, seeds=[0, 1])
  assert [t.seed for _, t in points] == [0, 1, 0, 1]
  for model_cfg, train_cfg in points:
    assert train_cfg.steps == sweep.steps_for(sweep.Budget(tokens_per_param=20), model_cfg, 4, 32)
    assert train_cfg.warmup == min(100, train_cfg.steps // 10)


def test_sweep_eta_follows_flops_per_step_not_the_first_point():
  step_time = lambda flops: 2e-9 * flops ** 0.8  # small steps are less efficient, as on a real CPU
  points = [(1e6 * 4 ** i, 500) for i in range(4)]  # (flops per step, steps) of four rungs
  eta = sweep.SweepEta()
  assert eta.remaining_s(points) is None
  eta.add(*points[0], step_time(points[0][0]), wall_s=500 * step_time(points[0][0]) + 3.0)
  one = eta.remaining_s(points[1:])  # proportional to FLOPs from one point: an overestimate, but not 0 or inf
  truth = sum(steps * step_time(f) + 3.0 for f, steps in points[2:])
  eta.add(*points[1], step_time(points[1][0]), wall_s=500 * step_time(points[1][0]) + 3.0)
  assert one > truth and eta.remaining_s(points[2:]) == pytest.approx(truth, rel=0.01)
  eta.add(1e9, 10, None, wall_s=1.0)  # a point with no timed steps (resumed at its end) teaches nothing
  assert eta.remaining_s(points[2:]) == pytest.approx(truth, rel=0.01)


def run_script(*flags):
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('flags, message', [
    (('--arch=moe', '--experts=2', '--k=3'), 'top_k=3 must be between 1 and n_experts=2'),
    (('--arch=moe', '--experts=0'), '--experts=0'),
    (('--arch=sparse',), 'flag --arch=sparse'),
    (('--ladder=',), '--ladder is empty'),
    (('--d_model=64',), '--d_model is set by the sweep'),
])
def test_bad_flags_fail_with_one_line(flags, message, tmp_path):
  result = run_script(*flags, f'--out={tmp_path}')
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr
  assert not list(tmp_path.iterdir())


def test_out_with_other_budget_is_refused(tmp_path):
  row = {'run_id': 'old', 'budget': {'tokens': 123, 'tokens_per_param': None}}
  (tmp_path / 'results.jsonl').write_text(json.dumps(row) + '\n')
  result = run_script('--tokens=1000', '--ladder=16x1,32x1,48x1', f'--out={tmp_path}')
  assert result.returncode == 2
  assert 'holds results made with token budget' in result.stderr and 'Traceback' not in result.stderr
  assert (tmp_path / 'results.jsonl').read_text() == json.dumps(row) + '\n'
