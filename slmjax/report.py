"""Text report of a sweep: one table row per run, fitted scaling laws, and MoE effective parameter counts.

Nothing here needs matplotlib: `summarize` imports slmjax.plots only when it draws.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from slmjax import atomic, compare, scaling
from slmjax.results import arch_label, group_rows

FIT_AXES = ('total_params', 'active_params', 'train_flops')


def fit_group(rows: list[dict], x_key: str, n_bootstrap: int = 100) -> scaling.PowerLaw | None:
  """L = E + A x^-alpha over one architecture's rows, or None with fewer than 3 distinct sizes."""
  x = np.array([r[x_key] for r in rows], dtype=float)
  if len(set(x.tolist())) < 3:
    return None
  return scaling.fit_power_law(x, [r['eval_loss'] for r in rows], n_bootstrap=n_bootstrap)


def fit_all(rows: list[dict], n_bootstrap: int = 100) -> dict:
  """{(arch label, x key): PowerLaw} for every architecture with at least 3 sizes."""
  fits = {}
  for label, group in group_rows(rows).items():
    for key in FIT_AXES:
      law = fit_group(group, key, n_bootstrap)
      if law is not None:
        fits[(label, key)] = law
  return fits


def table(rows: list[dict]) -> str:
  header = (f'{"arch":<14}{"d_model":>8}{"layers":>7}{"total":>12}{"active":>12}{"tokens":>12}{"eval loss":>10}'
            f'{"bpb":>7}{"step ms":>9}{"tok/s":>9}{"MFU":>7}{"weights":>10}')
  lines = [header, '-' * len(header)]
  for label, group in group_rows(rows).items():
    for r in group:
      mfu = f'{r["mfu"]:.1%}' if r.get('mfu') is not None else '-'
      bpb = f'{r["eval_bpb"]:.3f}' if r.get('eval_bpb') is not None else '-'
      lines.append(f'{label:<14}{r["d_model"]:>8}{r["n_layers"]:>7}{r["total_params"]:>12,}{r["active_params"]:>12,}'
                   f'{r["tokens"]:>12,}{r["eval_loss"]:>10.4f}{bpb:>7}{r["step_time_s"] * 1e3:>9.1f}'
                   f'{r["tokens_per_s"]:>9,.0f}{mfu:>7}{r["weight_bytes"] / 2**20:>8.1f}Mi')
  return '\n'.join(lines)


def fits_text(rows: list[dict], fits: dict) -> str:
  lines = ['fitted L = E + A x^-alpha (90% bootstrap interval on alpha):']
  for (label, key), law in fits.items():
    lines.append(f'  {label:<14} vs {key:<14} {law.label()}')
  dense = fits.get(('dense', 'total_params'))
  moe_rows = [r for r in rows if arch_label(r) != 'dense']
  if dense and moe_rows:
    lines.append('MoE effective parameter count (dense size with the same fitted loss; Clark et al. 2022):')
    for r in sorted(moe_rows, key=lambda r: r['total_params']):
      n_eff = scaling.effective_params(dense, r['eval_loss'])
      lines.append(f'  {arch_label(r):<14} d_model {r["d_model"]:>5}: N_eff {n_eff:>14,.0f} = '
                   f'{n_eff / r["active_params"]:.2f}x its active, {n_eff / r["total_params"]:.2f}x its total params')
  return '\n'.join(lines)


def _interval(gap: dict | None, pct: bool = True) -> str:
  if not gap:
    return '-'
  value, ci = (gap['pct'], gap.get('ci_pct')) if pct else (gap['nats'], gap.get('ci'))
  unit = '%' if pct else ''
  return f'{value:+.2f}{unit}' + (f' [{ci[0]:+.2f}, {ci[1]:+.2f}]' if ci else '')


def comparison_text(comparisons: list[dict]) -> str:
  """One line per MoE rung: its loss minus dense at matched active / total parameters and FLOPs (percent of the
  dense loss, 95% interval over seeds), and N_eff / N_active."""
  lines = ['MoE minus dense held-out loss, % of dense (95% interval over seeds; negative = MoE better):',
           f'  {"arch":<20}{"rung":>8}{"seeds":>7}  {"matched active":<22}{"matched total":<22}'
           f'{"matched FLOPs":<22}{"N_eff / active"}']
  for c in comparisons:
    rung = f'{c["d_model"]}x{c["n_layers"]}'
    if c.get('skipped'):
      lines.append(f'  {c["arch"]:<20}{rung:>8}  skipped: {c["skipped"]}')
      continue
    n_eff = c.get('n_eff_ratio') or {}
    ratio = '-' if n_eff.get('value') is None else f'{n_eff["value"]:.2f}x' + (
        f' [{n_eff["ci"][0]:.2f}, {n_eff["ci"][1]:.2f}]' if n_eff.get('ci') else '')
    lines.append(f'  {c["arch"]:<20}{rung:>8}{len(c["moe_seeds"]):>7}  {_interval(c["gap_active"]):<22}'
                 f'{_interval(c.get("gap_total")):<22}{_interval(c.get("gap_flops")):<22}{ratio}')
  return '\n'.join(lines)


def summarize(rows: list[dict], out_dir: str, plot: bool = True, log: Callable[[str], None] = print) -> None:
  """The end of a sweep (and all of experiments/plot.py): the table, the fitted laws, the paired dense-vs-MoE
  comparison (also written to `out_dir`/comparison.json) ending in one line that states the answer, and, with
  `plot`, the figures scaling.png and cost.png in `out_dir`."""
  log(table(rows))
  fits = fit_all(rows)
  log('\n' + fits_text(rows, fits))
  comparisons = compare.compare(rows)
  if comparisons:
    atomic.write_json(f'{out_dir}/comparison.json', comparisons)
    log('\n' + comparison_text(comparisons) + f'\n(all figures: {out_dir}/comparison.json)')
    log('\n' + compare.answer(comparisons))
  if plot:
    from slmjax import plots  # lazy, deliberately: matplotlib is imported only when figures are drawn
    for path in plots.plot_all(rows, out_dir, fits, comparisons):
      log(f'wrote {path}')
