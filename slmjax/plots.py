"""Figures from results rows (the dicts of `<out>/results.jsonl`): scaling curves with fitted laws, cost, the
MoE gap, isoFLOP profiles with the compute-optimal frontier, and the joint dense/MoE law.

Each architecture (dense, or MoE with its E and k) gets its own colour; the fitted law and its exponent with a
bootstrap interval go in the legend. Everything needed is in the rows, so plots can be redrawn without training.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from slmjax import atomic, report, scaling  # noqa: E402
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
  """Measured cost: the train step's peak memory (XLA's memory analysis of the compiled step) beside the weights
  alone, against total parameters; step time against active parameters; held-out loss against that measured
  peak (what a memory budget buys); and, for rows that carry it (`decode_cost.rung_cost`; older results do
  not), decode ms/token at batch 1 and at a large batch against active parameters. Seeds are averaged per
  rung."""
  groups = group_rows(rows)
  fig, ((ax_mem, ax_time), (ax_loss, ax_decode)) = plt.subplots(2, 2, figsize=(13, 9.5))
  decoded = False
  for color, (label, group) in zip(COLORS, groups.items()):
    rungs = _rung_means(group, ('total_params', 'active_params', 'weight_bytes', 'peak_memory_bytes',
                                'step_time_s', 'eval_loss', 'decode_ms_per_token_b1', 'decode_ms_per_token_large',
                                'decode_large_batch'))
    total = [r['total_params'] for r in rungs]
    measured = [(r['total_params'], r['peak_memory_bytes'] / 2**20) for r in rungs if r.get('peak_memory_bytes')]
    if measured:
      ax_mem.plot(*zip(*measured), 'o-', color=color, label=f'{label}: train step peak (measured)')
      ax_loss.plot(*zip(*sorted((r['peak_memory_bytes'] / 2**20, r['eval_loss']) for r in rungs
                                if r.get('peak_memory_bytes') and r.get('eval_loss') is not None)),
                   'o-', color=color, label=label)
    ax_mem.plot(total, [r['weight_bytes'] / 2**20 for r in rungs], 's--', color=color, alpha=0.7,
                label=f'{label}: weights')
    ax_time.plot([r['active_params'] for r in rungs], [r['step_time_s'] * 1e3 for r in rungs], 'o-', color=color,
                 label=label)
    for key, style, what in (('decode_ms_per_token_b1', 'o-', 'batch 1'),
                             ('decode_ms_per_token_large', 's--', 'batch {:g}')):
      line = [(r['active_params'], r[key]) for r in rungs if r.get(key)]
      if line:
        big = next((r['decode_large_batch'] for r in rungs if r.get('decode_large_batch')), 0)
        ax_decode.plot(*zip(*line), style, color=color, label=f'{label}: {what.format(big)}')
        decoded = True
  ax_mem.set(xscale='log', yscale='log', xlabel='total parameters', ylabel='memory (MiB)',
             title="memory: the train step's measured peak and the weights")
  ax_loss.set(xscale='log', xlabel='train step peak memory, measured (MiB)', ylabel='held-out loss (nats / token)',
              title='loss against measured memory')
  ax_time.set(xscale='log', yscale='log', xlabel='active parameters (per token)', ylabel='train step time (ms)',
              title='train step time (measured)')
  ax_decode.set(xscale='log', yscale='log' if decoded else 'linear', xlabel='active parameters (per token)',
                ylabel='decode ms / token (one step)', title='decode speed (measured)')
  if not decoded:
    ax_decode.text(0.5, 0.5, 'no decode cost in these rows\n(sweeps run with --nodecode_cost, or older results)',
                   ha='center', va='center', transform=ax_decode.transAxes)
  if not ax_loss.lines:
    ax_loss.text(0.5, 0.5, 'no measured peak memory in these rows', ha='center', va='center',
                 transform=ax_loss.transAxes)
  for ax in (ax_mem, ax_time, ax_loss, ax_decode):
    ax.grid(True, which='both', alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def _rung_means(group: list[dict], keys: tuple[str, ...]) -> list[dict]:
  """One dict per rung (d_model, n_layers) with the mean over its seeds of each key (None where missing)."""
  rungs = {}
  for r in group:
    rungs.setdefault((r['d_model'], r['n_layers']), []).append(r)
  means = []
  for same in rungs.values():
    values = lambda k: [r[k] for r in same if r.get(k) is not None]
    means.append({k: float(np.mean(values(k))) if values(k) else None for k in keys})
  return sorted(means, key=lambda r: r[keys[0]])


def plot_decode(rows: list[dict], path: str, peer_rows: list[dict] | None = None) -> str:
  """Decode tokens/s against batch size (log axes), one line per model and context (rows of
  `slmjax.decode_cost.sweep`): dense lines solid, MoE lines dashed, where they cross is where "MoE speed follows
  active parameters" stops holding; the peer's lines (if given) dotted in grey."""
  contexts = sorted({r['context'] for r in rows})
  fig, axes = plt.subplots(1, len(contexts), figsize=(6.2 * len(contexts), 4.8), squeeze=False)
  for ax, context in zip(axes[0], contexts):
    names = list(dict.fromkeys(r['model'] for r in rows))
    for color, name in zip(COLORS, names):
      line = sorted((r['batch'], r['decode_tokens_per_s'], r['arch']) for r in rows
                    if r['model'] == name and r['context'] == context)
      if line:
        ax.plot([x for x, _, _ in line], [y for _, y, _ in line], '--' if line[0][2] == 'moe' else '-',
                marker='o', color=color, label=name)
      peer = sorted((r['batch'], r['decode_tokens_per_s']) for r in (peer_rows or [])
                    if r['model'] == name and r['context'] == context and r['decode_tokens_per_s'])
      if peer:
        ax.plot(*zip(*peer), ':', marker='x', color=color, alpha=0.6, label=f'{name} (HF peer)')
    ax.set(xscale='log', yscale='log', xlabel='batch size (sequences decoded together)',
           ylabel='decode tokens/s', title=f'decode speed, context {context}')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


GAP_PANELS = (('gap_active', 'matched active parameters'), ('gap_total', 'matched total parameters (dense law)'),
              ('gap_flops', 'matched training FLOPs (dense law)'))


def plot_gap(comparisons: list[dict], path: str) -> str:
  """MoE minus dense held-out loss (% of dense) per rung with its 95% interval over seeds, one panel per
  matching (`slmjax.compare`), against the MoE rung's active parameters: below zero, MoE is better."""
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), sharey=True)
  done = [c for c in comparisons if not c.get('skipped')]
  for color, label in zip(COLORS[1:], sorted({c['arch'] for c in done})):
    mine = sorted((c for c in done if c['arch'] == label), key=lambda c: c['active_params'])
    for ax, (key, title) in zip(axes, GAP_PANELS):
      points = [(c['active_params'], c[key]) for c in mine if c.get(key)]
      if not points:
        continue
      x = np.array([p for p, _ in points], dtype=float)
      y = np.array([g['pct'] for _, g in points])
      lo = np.array([g['pct'] - g['ci_pct'][0] if g.get('ci_pct') else 0.0 for _, g in points])
      hi = np.array([g['ci_pct'][1] - g['pct'] if g.get('ci_pct') else 0.0 for _, g in points])
      ax.errorbar(x, y, yerr=[lo, hi], fmt='o-', color=color, capsize=4, label=label)
      ax.set_title(title, fontsize=10)
  for ax in axes:
    ax.axhline(0.0, color='black', lw=1)
    ax.set(xscale='log', xlabel='MoE active parameters (per token)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel('MoE - dense held-out loss (% of dense)')
  fig.suptitle('The MoE gain, rung by rung (95% intervals over seeds; below zero: MoE better)')
  fig.tight_layout()
  return _save(fig, path)


def plot_isoflop(rows: list[dict], laws: dict, path: str) -> str:
  """One panel per architecture with an L(N, D) fit: isoFLOP profiles, held-out loss against N (active params)
  at fixed C = 6 N D, measured (interpolated between each size's token counts, `scaling.isoflop_points`) as
  markers and the fitted law as lines, the fitted optimum starred; and a last panel, the compute-optimal
  frontier N_opt(C) of every architecture (exponent with its 90% interval) with the measured profiles' minima."""
  groups = {label: group for label, group in group_rows(rows).items() if label in laws}
  fig, axes = plt.subplots(1, len(groups) + 1, figsize=(5.5 * (len(groups) + 1), 4.8), squeeze=False)
  axes = axes[0]
  frontier = axes[-1]
  for arch_color, (ax, (label, group)) in zip(COLORS, zip(axes, groups.items())):
    law = laws[label]
    n, d, loss = report._grid(group)
    levels = scaling.isoflop_levels(n, d)
    grid = np.geomspace(n.min() / 2, n.max() * 2, 200)
    minima = []
    for color, compute in zip(plt.cm.viridis(np.linspace(0, 0.9, len(levels))), levels):
      sizes, measured = scaling.isoflop_points(n, d, loss, compute)
      ax.plot(grid, scaling.isoflop_curve(law, compute, grid), color=color, lw=1.3, label=f'C = {compute:.2g}')
      ax.scatter(sizes, measured, color=color, s=30, zorder=3)
      n_opt, _ = scaling.optimal_allocation(law, compute)
      ax.scatter([n_opt], [float(law(n_opt, compute / (6 * n_opt)))], marker='*', s=120, color=color, zorder=4)
      if len(sizes):
        minima.append((compute, sizes[np.argmin(measured)]))
    ax.set(xscale='log', xlabel='active parameters N', title=f'{label}: isoFLOP profiles (lines: fitted law)')
    ax.set_ylabel('held-out loss (nats / token)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
    compute = np.geomspace(levels.min() / 3, levels.max() * 3, 50) if len(levels) else np.geomspace(
        6 * n.min() * d.min(), 6 * n.max() * d.max(), 50)
    ci = law.n_exponent_ci
    frontier.plot(compute, scaling.optimal_allocation(law, compute)[0], color=arch_color,
                  label=f'{label}: N_opt ~ C^{law.n_exponent:.2f}' + (f' [{ci[0]:.2f}, {ci[1]:.2f}]' if ci else ''))
    if minima:
      frontier.scatter(*zip(*minima), color=arch_color, s=30, zorder=3)
  frontier.set(xscale='log', yscale='log', xlabel='training compute C = 6 N D (FLOPs)',
               ylabel='compute-optimal N (active)', title='compute-optimal frontier (dots: measured minima)')
  frontier.grid(True, which='both', alpha=0.3)
  frontier.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def plot_joint(rows: list[dict], laws: dict, path: str) -> str:
  """The joint dense/MoE law per family (`report.joint_rows`): held-out loss against active parameters, one
  colour per expert count (dense = 1), runs as markers and the fitted law as lines; and against the expert count
  at each measured size."""
  families = report.joint_rows(rows)
  fig, axes = plt.subplots(len(laws), 2, figsize=(12, 4.6 * len(laws)), squeeze=False)
  for (ax_n, ax_e), (key, law) in zip(axes, laws.items()):
    group = families[key]
    n = np.array([r['active_params'] for r in group], dtype=float)
    e = np.array([r.get('n_experts') or 1 for r in group], dtype=float)
    loss = np.array([r['eval_loss'] for r in group], dtype=float)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
    for color, count in zip(COLORS, sorted(set(e))):
      mine = e == count
      name = 'dense' if count == 1 else f'E={count:g}'
      ax_n.scatter(n[mine], loss[mine], color=color, s=28, zorder=3, label=name)
      ax_n.plot(grid, law(grid, count), color=color, lw=1.3)
    e_grid = np.geomspace(1, e.max() * 2, 100)
    rung = np.array([f'{r["d_model"]}x{r["n_layers"]}' for r in group])  # one line a rung: its E's N differ a bit
    rungs = sorted(set(rung), key=lambda name: n[rung == name].mean())
    for color, name in zip(plt.cm.viridis(np.linspace(0, 0.9, len(rungs))), rungs):
      mine, size = rung == name, n[rung == name].mean()
      ax_e.scatter(e[mine], loss[mine], color=color, s=28, zorder=3, label=f'{name} (N ~ {size:,.0f})')
      ax_e.plot(e_grid, law(size, e_grid), color=color, lw=1.3)
    ax_n.set(xscale='log', xlabel='active parameters N', ylabel='held-out loss (nats / token)',
             title=f'{key}: b = {law.b:.3f}, c = {law.c:+.4f}')
    ax_e.set(xscale='log', xlabel='experts E (dense = 1)', title='loss against expert count (lines: fitted law)')
    for ax in (ax_n, ax_e):
      ax.grid(True, which='both', alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle('Joint dense/MoE law (Clark et al. 2022): log L bilinear in log N and log E')
  fig.tight_layout()
  return _save(fig, path)


def plot_all(rows: list[dict], out_dir: str, fits: dict | None = None, comparisons: list[dict] | None = None,
             grid_rows: list[dict] | None = None, grid: dict | None = None, joint: dict | None = None
             ) -> list[str]:
  """Write scaling.png, cost.png and (given MoE-vs-dense comparisons) gap.png into out_dir; with L(N, D) fits
  of `grid_rows` (every WSD branch) isoflop.png, with joint laws joint.png; returns their paths."""
  if not rows:
    raise ValueError(f'no finished runs to plot in {out_dir}')
  paths = [plot_scaling(rows, os.path.join(out_dir, 'scaling.png'), fits),
           plot_cost(rows, os.path.join(out_dir, 'cost.png'))]
  if comparisons and any(not c.get('skipped') for c in comparisons):
    paths.append(plot_gap(comparisons, os.path.join(out_dir, 'gap.png')))
  if grid:
    paths.append(plot_isoflop(grid_rows or rows, grid, os.path.join(out_dir, 'isoflop.png')))
  if joint:
    paths.append(plot_joint(rows, joint, os.path.join(out_dir, 'joint.png')))
  return paths


def _save(fig, path: str) -> str:
  """Write atomically so an interrupted run never leaves half a PNG. Log axes that span a decade or more keep
  their labelled powers of ten and lose the labels of the ticks between (2x10^4 3x10^4 4x10^4 ran together)."""
  for ax in fig.axes:
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
      if axis.get_scale() == 'log' and min(limits) > 0 and max(limits) / min(limits) >= 10:
        axis.set_minor_formatter(ticker.NullFormatter())
  with atomic.replacing(path, suffix='.png') as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)
  return path
