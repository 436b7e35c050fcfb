"""Text report of a sweep: one table row per run, fitted scaling laws, and MoE effective parameter counts; with
WSD cooldown branches the (N, D) grid, its L(N, D) fit and compute-optimal frontier; with several expert counts
the joint dense/MoE law.

Nothing here needs matplotlib: `summarize` imports slmjax.plots only when it draws.
"""

from __future__ import annotations

from typing import Callable

import math

import numpy as np

from slmjax import atomic, compare, scaling
from slmjax.results import arch_label, group_rows

FIT_AXES = ('total_params', 'active_params', 'train_flops')


def full_budget(rows: list[dict]) -> list[dict]:
  """The rows trained on their sweep's whole budget: all but the shorter WSD cooldown branches (L(N) fits and
  the dense-vs-MoE comparison hold D fixed)."""
  return [r for r in rows if r.get('budget_fraction', 1.0) == 1.0]


def _grid(group: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(N active params, D tokens, eval loss) of one architecture's rows with a finite loss."""
  ok = [r for r in group if r.get('eval_loss') is not None and math.isfinite(r['eval_loss'])]
  return tuple(np.array([r[k] for r in ok], dtype=float) for k in ('active_params', 'tokens', 'eval_loss'))


def grid_fits(rows: list[dict], n_bootstrap: int = 100) -> dict[str, scaling.ChinchillaLaw]:
  """{arch label: L(N, D) fitted on its (N, D) grid} for every architecture with at least 5 distinct (N, D)
  points over at least 2 sizes and 2 token counts (WSD branches give them from one run per size)."""
  laws = {}
  for label, group in group_rows(rows).items():
    n, d, loss = _grid(group)
    if len(set(zip(n, d))) >= 5 and len(set(n)) >= 2 and len(set(d)) >= 2:
      laws[label] = scaling.fit_chinchilla(n, d, loss, n_bootstrap=n_bootstrap)
  return laws


def grid_text(rows: list[dict], laws: dict[str, scaling.ChinchillaLaw]) -> str:
  """The measured (N, D) grid (eval loss, mean over seeds) and, per architecture, its L(N, D) law and the
  compute-optimal frontier N_opt ~ C^a, D_opt ~ C^b (90% bootstrap intervals)."""
  lines = ['(N, D) grid: held-out loss, mean over seeds (N = active params, D = training tokens):']
  for label, group in group_rows(rows).items():
    if label not in laws:
      continue
    n, d, loss = _grid(group)
    tokens = sorted(set(d))
    lines.append(f'  {label:<20}' + ''.join(f'{f"D={t:,.0f}":>14}' for t in tokens))
    for size in sorted(set(n)):
      cells = [loss[(n == size) & (d == t)] for t in tokens]
      lines.append(f'  {f"N={size:,.0f}":<20}' + ''.join(f'{c.mean():>14.4f}' if len(c) else f'{"-":>14}'
                                                        for c in cells))
  lines.append('fitted L(N, D) = E + A N^-alpha + B D^-beta and its compute-optimal frontier (C = 6 N D):')
  for label, law in laws.items():
    ci = lambda v: f' [{v[0]:.2f}, {v[1]:.2f}]' if v else ''
    lines.append(f'  {label:<20} {law.label()}')
    lines.append(f'  {"":<20} N_opt ~ C^{law.n_exponent:.2f}{ci(law.n_exponent_ci)}, '
                 f'D_opt ~ C^{law.d_exponent:.2f}{ci(law.d_exponent_ci)} ({law.n_points} runs)')
  return '\n'.join(lines)


def joint_rows(rows: list[dict]) -> dict[str, list[dict]]:
  """{family: rows} of the joint dense/MoE law: dense rows with the MoE rows of one top-k and capacity setting,
  for every family holding at least 2 expert counts (dense counting as 1) and 5 runs over 2 sizes."""
  dense = [r for r in rows if arch_label(r) == 'dense']
  families = {}
  for r in rows:
    if arch_label(r) != 'dense':
      key = arch_label(r).replace(f'E={r["n_experts"]} ', 'E=* ')
      families.setdefault(key, list(dense)).append(r)
  return {key: group for key, group in families.items()
          if len({r.get('n_experts') or 1 for r in group}) >= 2 and len(group) >= 5
          and len({r['active_params'] for r in group}) >= 2}


def joint_fits(rows: list[dict], n_bootstrap: int = 100) -> dict[str, scaling.MoELaw]:
  """{family: Clark et al.'s joint law fitted over active params and expert count} (`joint_rows`)."""
  laws = {}
  for key, group in joint_rows(rows).items():
    laws[key] = scaling.fit_moe_law([r['active_params'] for r in group], [r.get('n_experts') or 1 for r in group],
                                    [r['eval_loss'] for r in group], n_bootstrap=n_bootstrap)
  return laws


def joint_text(laws: dict[str, scaling.MoELaw]) -> str:
  lines = ['joint dense/MoE law (Clark et al. 2022; N active params, E experts, dense E = 1; 90% intervals):']
  for key, law in laws.items():
    lines.append(f'  {key}: {law.label()}')
    lines.append(f'    {law.n_points} runs; doubling E (unsaturated) at N = {law.n_ref:.0e} multiplies the loss by '
                 f'2^b = {2 ** law.b:.4f}; the log-loss slope in log E {"flattens" if law.c > 0 else "steepens"} '
                 f'with N (c {law.c:+.4f})')
  return '\n'.join(lines)


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
  """The end of a sweep (and all of experiments/plot.py): the table, the fitted laws, the (N, D) grid with its
  frontier (WSD branches) and the joint MoE law (several expert counts), the paired dense-vs-MoE comparison
  (also written to `out_dir`/comparison.json) ending in one line that states the answer, and, with `plot`, the
  figures (scaling.png, cost.png, gap.png, isoflop.png, joint.png) in `out_dir`. Table, L(N) fits and
  comparison use the full-budget rows only (`full_budget`)."""
  everything, rows = rows, full_budget(rows)
  log(table(rows))
  fits = fit_all(rows)
  log('\n' + fits_text(rows, fits))
  grid = grid_fits(everything)
  if grid:
    log('\n' + grid_text(everything, grid))
  joint = joint_fits(rows)
  if joint:
    log('\n' + joint_text(joint))
  comparisons = compare.compare(rows)
  if comparisons:
    atomic.write_json(f'{out_dir}/comparison.json', comparisons)
    log('\n' + comparison_text(comparisons) + f'\n(all figures: {out_dir}/comparison.json)')
    log('\n' + compare.answer(comparisons))
  if plot:
    from slmjax import plots  # lazy, deliberately: matplotlib is imported only when figures are drawn
    for path in plots.plot_all(rows, out_dir, fits, comparisons, grid_rows=everything, grid=grid, joint=joint):
      log(f'wrote {path}')
