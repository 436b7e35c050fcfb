"""Figures from results rows (the dicts of `<out>/results.jsonl`): scaling curves with fitted laws, and cost.

Each architecture (dense, or MoE with its E and k) gets its own colour; the fitted law and its exponent with a
bootstrap interval go in the legend. Everything needed is in the rows, so plots can be redrawn without training.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slmjax import atomic, report  # noqa: E402
from slmjax.results import group_rows  # noqa: E402

SCALING_AXES = (('total_params', 'total parameters'), ('active_params', 'active parameters (per token)'),
                ('train_flops', 'training compute (FLOPs)'))
COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')


def plot_scaling(rows: list[dict], path: str, fits: dict | None = None) -> str:
  """Eval loss against total params, active params and training FLOPs, one panel each, with fitted laws."""
  fits = fits if fits is not None else {}
  groups = group_rows(rows)
  fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), sharey=True)
  for ax, (x_key, x_label) in zip(axes, SCALING_AXES):
    for color, (label, group) in zip(COLORS, groups.items()):
      x = np.array([r[x_key] for r in group], dtype=float)
      y = np.array([r['eval_loss'] for r in group], dtype=float)
      law = fits.get((label, x_key)) or report.fit_group(group, x_key)
      legend = label if law is None else f'{label}: alpha={law.alpha:.2f}' + (
          f' [{law.alpha_ci[0]:.2f}, {law.alpha_ci[1]:.2f}]' if law.alpha_ci else '')
      ax.scatter(x, y, color=color, s=28, zorder=3, label=legend)
      if law is not None:
        grid = np.logspace(np.log10(x.min()) - 0.1, np.log10(x.max()) + 0.1, 100)
        ax.plot(grid, law(grid), color=color, lw=1.5, alpha=0.8)
    ax.set_xscale('log')
    ax.set_xlabel(x_label)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8, loc='upper right', title='fit L = E + A x^-alpha (90% CI)', title_fontsize=8)
  axes[0].set_ylabel('held-out loss (nats / token)')
  fig.suptitle('Dense vs MoE scaling: held-out loss')
  fig.tight_layout()
  return _save(fig, path)


def plot_cost(rows: list[dict], path: str) -> str:
  """Measured cost: weight memory against total parameters, step time against active parameters."""
  groups = group_rows(rows)
  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
  for color, (label, group) in zip(COLORS, groups.items()):
    total = [r['total_params'] for r in group]
    ax_mem.plot(total, [r['weight_bytes'] / 2**20 for r in group], 'o-', color=color, label=label)
    ax_time.plot([r['active_params'] for r in group], [r['step_time_s'] * 1e3 for r in group], 'o-', color=color,
                 label=label)
  ax_mem.set(xscale='log', yscale='log', xlabel='total parameters', ylabel='weight memory (MiB)',
             title='memory follows total parameters')
  ax_time.set(xscale='log', yscale='log', xlabel='active parameters (per token)', ylabel='train step time (ms)',
              title='speed follows active parameters')
  for ax in (ax_mem, ax_time):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_all(rows: list[dict], out_dir: str, fits: dict | None = None) -> list[str]:
  """Write scaling.png and cost.png into out_dir; returns their paths."""
  if not rows:
    raise ValueError(f'no finished runs to plot in {out_dir}')
  return [plot_scaling(rows, os.path.join(out_dir, 'scaling.png'), fits),
          plot_cost(rows, os.path.join(out_dir, 'cost.png'))]


def _save(fig, path: str) -> str:
  """Write atomically so an interrupted run never leaves half a PNG."""
  with atomic.replacing(path, suffix='.png') as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)
  return path
