"""WSD: the schedule's values, branches equal to straight runs of their length, a larger --steps continuing the
stable trunk (no re-stretch), and the grid / frontier / joint-law analysis from synthetic rows."""

import numpy as np
import pytest

from slmjax import ModelConfig, optim, report, results, scaling, sweep, wsd
from slmjax.config import TrainConfig
from slmjax.train import train

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
WSD = TrainConfig(steps=20, batch_size=4, seq_len=32, warmup=2, eval_every=0, eval_batches=1, log_every=1,
                  checkpoint_every=0, schedule='wsd', branches='0.5')


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv('SLMJAX_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'slmjax-cache'))


def test_wsd_schedule_values():
  cfg = TrainConfig(steps=100, warmup=10, schedule='wsd', min_lr_ratio=0.0, lr=1.0)
  lr = optim.lr_schedule(cfg)
  assert float(lr(5)) == pytest.approx(0.5)
  assert [float(lr(s)) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
  assert float(lr(90)) == pytest.approx(1 - np.sqrt(0.5))  # 1 - sqrt cooldown over the last 20 steps
  assert float(lr(100)) == pytest.approx(0.0)
  longer = optim.lr_schedule(cfg.replace(steps=400))
  assert [float(longer(s)) for s in range(80)] == pytest.approx([float(lr(s)) for s in range(80)])  # no re-stretch
  assert cfg.replace(branches='0.25,0.5').branch_steps == (25, 50, 100)
  with pytest.raises(ValueError, match='needs schedule=wsd'):
    TrainConfig(branches='0.5')
  with pytest.raises(ValueError, match='fraction'):
    TrainConfig(steps=100, warmup=10, schedule='wsd', branches='1.5')


def test_branches_equal_straight_runs_and_larger_steps_continue_the_trunk(tmp_path):
  both = wsd.train_wsd(MODEL, WSD, tmp_path / 'both', log=None)
  assert sorted(both) == [10, 20]
  straight = train(MODEL, wsd.branch_config(WSD, 10), tmp_path / 'straight', log=None)
  assert both[10]['eval_loss'] == straight['eval_loss']  # the 10-step branch is the 10-step WSD run
  short = wsd.train_wsd(MODEL, WSD.replace(steps=10, branches=''), tmp_path / 'grow', log=None)
  grown = wsd.train_wsd(MODEL, WSD.replace(steps=20, branches=''), tmp_path / 'grow', log=None)
  assert short[10]['eval_loss'] == straight['eval_loss']
  assert grown[20]['eval_loss'] == both[20]['eval_loss']  # continued from the stable trunk, not the cooled end


def test_a_sweep_rerun_with_more_branches_forks_them_from_the_same_trunk(tmp_path):
  budget = sweep.Budget(tokens=WSD.steps * WSD.tokens_per_step)
  sweep.run_sweep([(MODEL, WSD)], budget, str(tmp_path), log=lambda line: None)
  lines = []
  rows = sweep.run_sweep([(MODEL, WSD.replace(branches='0.5,0.75'))], budget, str(tmp_path), log=lines.append)
  assert [r['branch_steps'] for r in rows] == [10, 15, 20]
  assert len(results.read_rows(tmp_path)) == 3  # the 10- and 20-step rows were kept, not redone
  assert '0 already finished, 1 with some of their cooldown branches done' in lines[0]
  assert not any('wsd trunk' in line for line in lines)  # the trunk was not trained again
  assert any('branch 15' in line and 'starts from step 8' in line for line in lines)  # the trunk's checkpoint
  assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 1
  assert rows[1]['wsd_run'] == rows[0]['wsd_run'] == sweep.point_dir(tmp_path, MODEL, WSD).name


def synthetic_grid():
  true = scaling.ChinchillaLaw(E=1.7, A=400.0, alpha=0.34, B=2000.0, beta=0.28)
  rng, rows = np.random.default_rng(0), []
  for n_experts, scale in ((0, 1.0), (4, 0.97), (8, 0.95)):
    for d_model, n in ((32, 1e5), (64, 3e5), (96, 1e6), (128, 3e6)):
      for frac in (0.25, 0.5, 1.0):
        rows.append({'arch': 'moe' if n_experts else 'dense', 'n_experts': n_experts, 'top_k': 2,
                     'active_params': n, 'total_params': n, 'tokens': 2e8 * frac, 'budget_fraction': frac,
                     'eval_loss': float(true(n, 2e8 * frac)) * scale * np.exp(rng.normal(0, 0.002)),
                     'd_model': d_model, 'n_layers': 2, 'model_config': {'capacity_factor': None}})
  return rows


def test_grid_frontier_and_joint_law_from_synthetic_rows():
  rows = synthetic_grid()
  laws = report.grid_fits(rows, n_bootstrap=20)
  dense = laws['dense']
  assert dense.n_exponent == pytest.approx(0.28 / 0.62, abs=0.08)
  assert dense.n_exponent_ci[0] <= dense.n_exponent <= dense.n_exponent_ci[1]
  n, d, loss = report._grid(results_dense := [r for r in rows if r['arch'] == 'dense'])
  levels = scaling.isoflop_levels(n, d)
  sizes, measured = scaling.isoflop_points(n, d, loss, levels[0])
  assert len(sizes) >= 2 and np.all(np.isfinite(measured))
  assert len(report.full_budget(rows)) == len(rows) // 3 and results_dense
  joint = report.joint_fits(report.full_budget(rows), n_bootstrap=20)
  law = joint['moe E=* k=2']
  assert law.b < 0 and law.b_ci[1] < 0  # more experts, lower loss, resolved
  assert 'E=* k=2' in report.joint_text(joint) and 'N_opt' in report.grid_text(rows, laws)
