"""Text report of a sweep: one table row per run, router-health warnings, fitted scaling laws, and MoE effective
parameter counts; with WSD cooldown branches the (N, D) grid, its L(N, D) fit and compute-optimal frontier; with
several expert counts the joint dense/MoE law; the paired dense-vs-MoE comparison and its answer, last.

Nothing here needs matplotlib: `summarize` imports slmjax.plots only when it draws.
"""

from __future__ import annotations

from typing import Callable

import math

import numpy as np

from slmjax import atomic, compare, scaling
from slmjax.results import arch_label, group_rows

FIT_AXES = ('total_params', 'active_params', 'train_flops')
COLLAPSED_LOAD = 3.0  # the busiest expert holds 3x its uniform share or more
HEAVY_DROPS = 0.10


def columns(cells: list[list[str]], left: int = 1, indent: str = '') -> list[str]:
  """Rows of cells as lines of columns as wide as their widest cell (two spaces apart): the first `left` columns
  flush left, the rest right, so no label or interval ever runs into its neighbour."""
  if not cells:
    return []
  widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
  return [indent + '  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
          .rstrip() for row in cells]


def router_warning(row: dict) -> str | None:
  """A one-line warning for an MoE row whose router collapsed or that dropped heavily in training or evaluation
  (None if healthy or dense)."""
  problems = []
  if (row.get('expert_load_max_over_mean') or 0) >= COLLAPSED_LOAD:
    problems.append(f'busiest expert at {row["expert_load_max_over_mean"]:.1f}x its share (collapsing router)')
  if (row.get('train_drop_fraction') or 0) >= HEAVY_DROPS:
    problems.append(f'{row["train_drop_fraction"]:.0%} of assignments dropped in training (raise '
                    '--capacity_factor, or 0 for dropless)')
  if (row.get('eval_drop_fraction') or 0) >= HEAVY_DROPS:
    problems.append(f'{row["eval_drop_fraction"]:.0%} dropped in evaluation (raise --eval_capacity_factor, or 0 '
                    'for dropless)')
  return f'warning: {row["run_id"]}: ' + '; '.join(problems) if problems else None


def health_text(rows: list[dict]) -> str | None:
  """Router health of the MoE rows: the warnings (`router_warning`), or None when every router is healthy."""
  warnings = [w for w in map(router_warning, rows) if w]
  if not warnings:
    return None
  moe = sum(1 for r in rows if arch_label(r) != 'dense')
  return '\n'.join([f'router health: {len(warnings)} of {moe} MoE runs warn (they weaken the comparison below):',
                    *(f'  {w}' for w in warnings)])


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
    cells = [[label, *(f'D={t:,.0f}' for t in tokens)]]
    for size in sorted(set(n)):
      means = [loss[(n == size) & (d == t)] for t in tokens]
      cells.append([f'N={size:,.0f}', *(f'{c.mean():.4f}' if len(c) else '-' for c in means)])
    lines += columns(cells, indent='  ')
  lines.append('fitted L(N, D) = E + A N^-alpha + B D^-beta and its compute-optimal frontier (C = 6 N D):')
  ci = lambda v: f' [{v[0]:.2f}, {v[1]:.2f}]' if v else ''
  for label, law in laws.items():
    lines.append(f'  {label}: {law.label()}')
    lines.append(f'    N_opt ~ C^{law.n_exponent:.2f}{ci(law.n_exponent_ci)}, '
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
  cells = [['arch', 'd_model', 'layers', 'total', 'active', 'tokens', 'eval loss', 'bpb', 'step ms', 'tok/s', 'MFU',
            'weights']]
  for label, group in group_rows(rows).items():
    for r in group:
      mfu = f'{r["mfu"]:.1%}' if r.get('mfu') is not None else '-'
      bpb = f'{r["eval_bpb"]:.3f}' if r.get('eval_bpb') is not None else '-'
      cells.append([label, str(r['d_model']), str(r['n_layers']), f'{r["total_params"]:,}',
                    f'{r["active_params"]:,}', f'{r["tokens"]:,}', f'{r["eval_loss"]:.4f}', bpb,
                    f'{r["step_time_s"] * 1e3:.1f}', f'{r["tokens_per_s"]:,.0f}', mfu,
                    f'{r["weight_bytes"] / 2**20:.1f}Mi'])
  header, *lines = columns(cells)
  return '\n'.join([header, '-' * len(header), *lines])


def fits_text(rows: list[dict], fits: dict) -> str:
  lines = ['fitted L = E + A x^-alpha (90% bootstrap interval on alpha):']
  lines += columns([[label, f'vs {key}', law.label('C' if key == 'train_flops' else 'N')]
                    for (label, key), law in fits.items()], left=3, indent='  ')
  dense = fits.get(('dense', 'total_params'))
  moe_rows = [r for r in rows if arch_label(r) != 'dense']
  if dense and moe_rows:
    lines.append('MoE effective parameter count (dense size with the same fitted loss; Clark et al. 2022):')
    cells = []
    for r in sorted(moe_rows, key=lambda r: (arch_label(r), r['total_params'])):
      n_eff = scaling.effective_params(dense, r['eval_loss'])
      cells.append([arch_label(r), f'd_model {r["d_model"]}', f'N_eff {n_eff:,.0f}',
                    f'= {n_eff / r["active_params"]:.2f}x its active, {n_eff / r["total_params"]:.2f}x its total '
                    'params'])
    lines += columns(cells, left=2, indent='  ')
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
  bound = lambda v: 'inf' if v is None else f'{v:.2f}'  # unbounded: beyond the dense law's floor
  cells, skipped = [['arch', 'rung', 'seeds', 'matched active', 'matched total', 'matched FLOPs', 'N_eff / active']], []
  for c in comparisons:
    rung = f'{c["d_model"]}x{c["n_layers"]}'
    if c.get('skipped'):
      skipped.append(f'  {c["arch"]} {rung}: skipped: {c["skipped"]}')
      continue
    n_eff = c.get('n_eff_ratio') or {}
    ratio = '-' if n_eff.get('value') is None else f'{n_eff["value"]:.2f}x' + (
        f' [{bound(n_eff["ci"][0])}, {bound(n_eff["ci"][1])}]' if n_eff.get('ci') else '')
    cells.append([c['arch'], rung, str(len(c['moe_seeds'])), _interval(c['gap_active']),
                  _interval(c.get('gap_total')), _interval(c.get('gap_flops')), ratio])
  return '\n'.join(['MoE minus dense held-out loss, % of dense (95% interval over seeds; negative = MoE better):',
                    *(columns(cells, indent='  ') if len(cells) > 1 else []), *skipped])


def summarize(rows: list[dict], out_dir: str, plot: bool = True, log: Callable[[str], None] = print) -> None:
  """The end of a sweep (and all of experiments/plot.py): the table, the fitted laws, the (N, D) grid with its
  frontier (WSD branches) and the joint MoE law (several expert counts), the paired dense-vs-MoE comparison
  (also written to `out_dir`/comparison.json) ending in one line that states the answer, and, with `plot`, the
  figures (scaling.png, cost.png, gap.png, isoflop.png, joint.png) in `out_dir`. Table, L(N) fits and
  comparison use the full-budget rows only (`full_budget`)."""
  everything, rows = rows, full_budget(rows)
  log(table(rows))
  health = health_text(rows)
  if health:
    log('\n' + health)
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
  if plot:
    from slmjax import plots  # lazy, deliberately: matplotlib is imported only when figures are drawn
    for path in plots.plot_all(rows, out_dir, fits, comparisons, grid_rows=everything, grid=grid, joint=joint):
      log(f'wrote {path}')
  if comparisons:  # last, where it is seen
    log('\n' + compare.answer(comparisons))
