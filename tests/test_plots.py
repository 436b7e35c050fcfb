"""Plots are drawn from results rows alone, written atomically, and readable (one legend entry per arch)."""

import os
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from slmjax import compare, plots, report, results


def synthetic_rows():
  rows = []
  for arch, n_experts, offset in (('dense', 0, 0.0), ('moe', 8, -0.1)):
    for total in (1e5, 3e5, 1e6, 3e6):
      active = total if arch == 'dense' else total / 3
      for seed in (0, 1):
        rows.append({'arch': arch, 'n_experts': n_experts, 'top_k': 2, 'total_params': total,
                     'active_params': active, 'train_flops': 6 * active * 1e6, 'seed': seed,
                     'eval_loss': 1.5 + 30 * total ** -0.3 + offset + 0.002 * seed, 'd_model': int(total) // 1000,
                     'n_layers': 2, 'weight_bytes': 4 * total, 'peak_memory_bytes': 20 * total,
                     'step_time_s': active * 1e-7})
  return rows


def test_rows_group_by_architecture():
  groups = results.group_rows(synthetic_rows())
  assert list(groups) == ['dense', 'moe E=8 k=2']
  law = report.fit_group(groups['dense'], 'total_params', n_bootstrap=0)
  assert law.alpha == pytest.approx(0.3, abs=0.02)


def test_plot_all_writes_pngs(tmp_path):
  rows = synthetic_rows()
  for row in rows:  # MoE rungs get their dense rung's size, as the sweep gives them
    row['d_model'] = int(row['active_params']) // 1000 if row['arch'] == 'moe' else row['d_model']
  paths = plots.plot_all(rows, str(tmp_path), comparisons=compare.compare(rows, n_bootstrap=20))
  assert sorted(os.path.basename(p) for p in paths) == ['cost.png', 'gap.png', 'scaling.png']
  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert np.std(image) > 0.01  # not blank
  assert not [p for p in os.listdir(tmp_path) if '.tmp' in p]


def test_plot_all_refuses_no_rows(tmp_path):
  with pytest.raises(ValueError, match='no finished runs'):
    plots.plot_all([], str(tmp_path))


def test_text_report_does_not_import_matplotlib(tmp_path):
  code = (f'import sys; from slmjax import report; rows = {synthetic_rows_plain()!r}; '
          f'report.summarize(rows, {str(tmp_path)!r}, plot=False, log=lambda s: None); '
          'assert "matplotlib" not in sys.modules, "report pulled in matplotlib"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path)
  assert (tmp_path / 'comparison.json').exists()


def synthetic_rows_plain():
  return [{**r, 'd_model': 32, 'n_layers': 2, 'tokens': 1000, 'eval_bpb': None, 'tokens_per_s': 1.0}
          for r in synthetic_rows()]


def test_cost_plot_gains_a_decode_panel_and_still_draws_old_rows(tmp_path):
  old = synthetic_rows()
  new = [{**r, 'decode_ms_per_token_b1': r['active_params'] * 1e-6, 'decode_large_batch': 64,
          'decode_ms_per_token_large': r['total_params'] * 1e-5} for r in old]
  images = [matplotlib.image.imread(plots.plot_cost(rows, str(tmp_path / f'{name}.png')))
            for name, rows in (('old', old), ('new', new))]
  assert images[0].shape == images[1].shape
  inked = lambda image: int((image[:, 2 * image.shape[1] // 3:, :3].mean(axis=-1) < 0.9).sum())  # decode panel
  assert inked(images[1]) > inked(images[0]) + 1000  # the decode lines (and legend) of the new rows


def test_text_report_warns_about_routers_keeps_columns_apart_and_ends_with_the_answer(tmp_path):
  """Every sweep's report repeats the router-health warnings (a resumed sweep trains nothing and would print none
  otherwise), its columns never run together however long a label or interval, and the answer is its last line;
  a sweep too small to fit anything still gets its report."""
  rows = [{**r, 'd_model': int(r['active_params']) // 1000, 'tokens': 1000, 'eval_bpb': None, 'tokens_per_s': 1.0,
           'run_id': f'{r["arch"]}-{r["total_params"]:.0e}-s{r["seed"]}'} for r in synthetic_rows()]  # rung: active
  rows[-1].update(expert_load_max_over_mean=3.4, eval_drop_fraction=0.2)
  lines = []
  report.summarize(rows, str(tmp_path), plot=False, log=lines.append)
  text = '\n'.join(lines)
  assert ('router health: 1 of 8 MoE runs warn' in text and 'collapsing router' in text
          and '20% dropped in evaluation (raise --eval_capacity_factor' in text)
  table = [line for line in report.comparison_text(compare.compare(rows, n_bootstrap=20)).splitlines()[2:]
           if 'skipped' not in line]
  assert len(table) == 2 and all(re.search(r'\]  +[+-]\d', line) for line in table)  # intervals 2+ spaces apart
  assert lines[-1].strip().startswith('MoE E=8 k=2 ')
  lines.clear()
  (tmp_path / 'small').mkdir()
  report.summarize(rows[-2:], str(tmp_path / 'small'), plot=False, log=lines.append)  # one MoE rung, no dense
  assert 'nothing to compare (no dense rows)' in lines[-1]
