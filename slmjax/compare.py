"""Dense vs MoE, rung by rung, with uncertainty over seeds: what `answer` puts in one line.

For each MoE architecture (`results.arch_label`) and each rung (d_model, n_layers), the gap is MoE eval loss
minus dense, in nats and in percent of the dense loss, with a 95% interval:
- at matched active parameters: the dense runs of the same rung (the sweep gives an MoE rung its dense rung's
  active parameters). Seeds run on both sides are paired (t interval on the per-seed differences, n - 1 dof): a
  seed's shared luck (data order, init) cancels. Otherwise a Welch interval; with one seed on a side, none.
- at matched total parameters and at matched training FLOPs: the dense power law fitted over all dense runs
  (`scaling.fit_power_law`), evaluated at the MoE rung's x. The spread comes from a bootstrap (the dense law
  refitted on seeds resampled within each dense rung, and the MoE seeds resampled, each alone), the width from
  Student's t: estimate +- t(dof) * sqrt(v_moe + v_law), each variance its bootstrap's times n / (n - 1), dof by
  Welch-Satterthwaite from the MoE seeds and the dense runs. A bootstrap's own percentiles are too narrow with
  a handful of seeds (a mean of n resampled values varies (n - 1) / n as much as the mean, and its quantiles
  are normal ones; at n = 2 there are three distinct resamples): in tests/test_compare.py's simulated sweeps
  the percentiles covered the true gap 83-95% of the time at a nominal 95% with 2-4 seeds, these 94-99%.
- N_eff / N_active: the dense law against active parameters inverted at the MoE loss (Clark et al. 2022), the
  same interval on log N_eff. N_eff is None (unbounded) when the MoE loss is below the dense law's floor E.
Percent intervals divide the nats interval by the dense loss (taken as fixed). Rows without a finite eval_loss
are left out; a seed run twice counts once, at its mean loss.
"""

from __future__ import annotations

import collections
import math

import numpy as np
from scipy import special

from slmjax import scaling
from slmjax.results import arch_label

LEVEL = 0.95
LAW_AXES = {'active': 'active_params', 'total': 'total_params', 'flops': 'train_flops'}


def _rungs(rows: list[dict]) -> dict[tuple[int, int], dict]:
  """{(d_model, n_layers): {'seeds': {seed: mean eval loss}, x key: mean x}} for one architecture's rows."""
  grouped = collections.defaultdict(list)
  for row in rows:
    grouped[(int(row['d_model']), int(row['n_layers']))].append(row)
  rungs = {}
  for rung, group in sorted(grouped.items()):
    by_seed = collections.defaultdict(list)
    for row in group:
      by_seed[row.get('seed', 0)].append(float(row['eval_loss']))
    rungs[rung] = {'seeds': {s: float(np.mean(v)) for s, v in sorted(by_seed.items())},
                   **{key: float(np.mean([r[key] for r in group])) for key in LAW_AXES.values()}}
  return rungs


def _gap(nats: float, reference: float, ci, method: str) -> dict:
  return {'nats': nats, 'pct': 100 * nats / reference, 'ci': ci,
          'ci_pct': None if ci is None else [100 * v / reference for v in ci], 'method': method}


def _t_interval(mean: float, se: float, dof: float, level: float) -> list[float]:
  # special.stdtrit is Student's t quantile, stats.t.ppf's value: scipy.stats costs 0.9 s to import, and every
  # sweep.py run (a bad flag too) imported it through report -> compare.
  half = special.stdtrit(dof, (1 + level) / 2) * se
  return [float(mean - half), float(mean + half)]


def _matched_gap(moe: dict, dense: dict, level: float) -> dict:
  """MoE minus dense loss at one rung: paired by seed where 2+ seeds are on both sides, else Welch."""
  common = sorted(moe.keys() & dense.keys())
  dense_loss = float(np.mean(list(dense.values())))
  if len(common) >= 2:
    diff = np.array([moe[s] - dense[s] for s in common])
    ci = _t_interval(diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff)), len(diff) - 1, level)
    return _gap(float(diff.mean()), dense_loss, ci, f'paired t over {len(common)} seeds')
  a, b = np.array(list(moe.values())), np.array(list(dense.values()))
  nats = float(a.mean() - b.mean())
  if len(a) < 2 or len(b) < 2:
    return _gap(nats, dense_loss, None, 'one seed: no interval')
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
  return _gap(nats, dense_loss, _t_interval(nats, math.sqrt(va + vb), dof, level),
              f'Welch ({len(a)} MoE, {len(b)} dense seeds, unpaired)')


def _dense_laws(dense: dict, n_bootstrap: int, rng) -> dict:
  """{axis: (law fitted over every dense run, [laws refitted on seeds resampled within each rung])}."""
  losses = [np.array(list(r['seeds'].values())) for r in dense.values()]
  laws = {}
  for axis, key in LAW_AXES.items():
    x = np.concatenate([np.full(len(v), r[key]) for v, r in zip(losses, dense.values())])
    laws[axis] = (scaling.fit_power_law(x, np.concatenate(losses), n_bootstrap=0), [], x)
  for _ in range(n_bootstrap):
    boot = np.concatenate([rng.choice(v, len(v)) for v in losses])
    for law, boots, x in laws.values():
      boots.append(scaling.fit_power_law(x, boot, n_bootstrap=0, start=law))
  return {axis: (law, boots, (x.min(), x.max())) for axis, (law, boots, x) in laws.items()}


def _finite(v: float):
  return v if math.isfinite(v) else None


def _two_part_interval(estimate: float, moe_samples, law_samples, n_moe: int, n_dense: int, dense_runs: int,
                       level: float) -> list[float | None]:
  """estimate +- t(dof) * sqrt(v_moe + v_law) (module docstring): each variance that of its bootstrap samples
  (MoE seeds resampled with the law held, or the law refitted with the MoE mean held) times n / (n - 1) for
  resampling n seeds, dof by Welch-Satterthwaite from n_moe - 1 and dense_runs - 3 (the law's 3 parameters).
  The upper end is None (unbounded) when some law sample is infinite (an N_eff beyond the dense floor)."""
  parts = []
  for samples, n in ((moe_samples, n_moe), (law_samples, n_dense)):
    samples = np.asarray(samples, dtype=float)
    finite = samples[np.isfinite(samples)]
    parts.append((finite.var(ddof=1) * n / (n - 1) if len(finite) > 1 else 0.0, len(finite) == len(samples)))
  (v_moe, moe_ok), (v_law, law_ok) = parts
  dof_law = max(dense_runs - 3, 1)
  denominator = v_moe ** 2 / (n_moe - 1) + v_law ** 2 / dof_law
  dof = (v_moe + v_law) ** 2 / denominator if denominator > 0 else n_moe - 1
  lo, hi = _t_interval(estimate, math.sqrt(v_moe + v_law), dof, level)
  return [lo, hi if moe_ok and law_ok else None]


def _law_gaps(moe_losses: np.ndarray, rung: dict, laws: dict, seeds: tuple[int, int, int], no_ci: str | None,
              level: float, rng) -> dict:
  """Gaps to the dense law at the MoE rung's total params and FLOPs, and N_eff / N_active, with intervals from
  two bootstraps, the MoE seeds resampled and the dense law refitted (`_two_part_interval`; none when `no_ci`
  says why not). `seeds`: (MoE seeds, fewest seeds of a dense rung, dense runs)."""
  n_boot = 0 if no_ci else len(laws['active'][1])
  moe_mean = float(moe_losses.mean())
  moe_boot = np.array([rng.choice(moe_losses, len(moe_losses)).mean() for _ in range(n_boot)])
  interval = lambda estimate, moe_samples, law_samples: _two_part_interval(
      estimate, moe_samples, law_samples, *seeds, level)
  method = no_ci or f'bootstrap variances ({n_boot} refits), Welch t'
  out = {}
  for axis in ('total', 'flops'):
    law, boots, (lo, hi) = laws[axis]
    x, reference = rung[LAW_AXES[axis]], float(law(rung[LAW_AXES[axis]]))
    nats = moe_mean - reference
    ci = interval(nats, moe_boot - reference, [moe_mean - float(b(x)) for b in boots]) if n_boot else None
    out[f'gap_{axis}'] = {**_gap(nats, reference, ci, method), 'x': x, 'extrapolated': not lo <= x <= hi}
  law, boots, _ = laws['active']
  active = rung['active_params']
  ratio = _finite(law.inverse(moe_mean) / active)
  ci = None
  if n_boot and ratio is not None:
    log_ratio = lambda law_, loss: math.log(law_.inverse(loss) / active)
    log_ci = interval(math.log(ratio), [log_ratio(law, m) for m in moe_boot], [log_ratio(b, moe_mean) for b in boots])
    ci = [None if v is None else math.exp(v) for v in log_ci]
  out['n_eff_ratio'] = {'value': ratio, 'ci': ci}
  return out


def compare(rows: list[dict], n_bootstrap: int = 200, seed: int = 0, level: float = LEVEL) -> list[dict]:
  """One JSON-serialisable dict per (MoE architecture, rung): the gaps described in the module docstring; a rung
  on one side only gets just arch, d_model, n_layers and `skipped` (why)."""
  groups = collections.defaultdict(list)
  for row in rows:
    if row.get('eval_loss') is not None and math.isfinite(row['eval_loss']):
      groups[arch_label(row)].append(row)
  dense = _rungs(groups.pop('dense', []))
  rng = np.random.default_rng(seed)
  dense_multi = all(len(r['seeds']) >= 2 for r in dense.values())  # else resampling holds a rung fixed
  laws = _dense_laws(dense, n_bootstrap if dense_multi else 0, rng) if len(dense) >= 3 and groups else None
  out = []
  for label in sorted(groups, key=lambda label: (groups[label][0]['n_experts'], groups[label][0]['top_k'])):
    moe = _rungs(groups[label])
    for rung in sorted(moe.keys() | dense.keys()):
      entry = {'arch': label, 'd_model': rung[0], 'n_layers': rung[1], 'skipped': None, 'level': level}
      if rung not in dense or rung not in moe:
        reason = ('no dense rows' if not dense else
                  'no dense run at this rung' if rung in moe else 'no MoE run at this rung')
        out.append({**entry, 'skipped': reason})
        continue
      m, d = moe[rung], dense[rung]
      losses = np.array(list(m['seeds'].values()))
      entry.update(moe_seeds=list(m['seeds']), dense_seeds=list(d['seeds']), moe_loss=float(losses.mean()),
                   dense_loss=float(np.mean(list(d['seeds'].values()))),
                   **{key: m[key] for key in LAW_AXES.values()},
                   gap_active=_matched_gap(m['seeds'], d['seeds'], level))
      if laws is None:
        entry.update(gap_total=None, gap_flops=None, n_eff_ratio=None,
                     note=f'{len(dense)} dense rungs: a dense law needs 3, so no total/FLOP-matched gap or N_eff')
      else:
        no_ci = ('one seed: no interval' if len(losses) < 2 else None if dense_multi else
                 'one seed in a dense rung: no interval')
        seeds = (len(losses), min(len(r['seeds']) for r in dense.values()),
                 sum(len(r['seeds']) for r in dense.values()))
        entry.update(_law_gaps(losses, m, laws, seeds, no_ci, level, rng))
      out.append(entry)
  return out


def _verdict(gaps: list[dict], what: str, level: float) -> str:
  """'beats <what> on 4 of 4 rungs by 0.6-6.0% (95% intervals exclude zero on 3 of 4, 0.2 expected by chance)':
  over many rungs an interval or two excludes zero by chance alone, so the text says how many to expect."""
  pc = f'{level:.0%}'
  pct = [g['pct'] for g in gaps]
  better, worse = sum(p < 0 for p in pct), sum(p > 0 for p in pct)
  if better == len(pct) or worse == len(pct):
    size = [abs(p) for p in pct]
    head = f'{"beats" if better else "trails"} {what} on {len(pct)} of {len(pct)} rungs by ' + (
        f'{min(size):.1f}-{max(size):.1f}%' if len(size) > 1 else f'{size[0]:.1f}%')
  else:
    head = f'beats {what} on {better} of {len(pct)} rungs (gap {min(pct):+.1f}% to {max(pct):+.1f}%)'
  cis = [g['ci'] for g in gaps if g['ci'] is not None]
  below, above = sum(hi < 0 for _, hi in cis), sum(lo > 0 for lo, _ in cis)
  if not cis:
    return f'{head} (one seed: no intervals)'
  if below + above == 0:
    return f'{head}: within noise (every {pc} interval includes zero)'
  split = f': {below} better, {above} worse' if below and above else ''
  chance = f', {(1 - level) * len(cis):.2g} expected by chance' if below + above < len(cis) else ''
  return f'{head} ({pc} intervals exclude zero on {below + above} of {len(cis)}{split}{chance})'


def _arch_answer(label: str, items: list[dict]) -> str:
  name = label.replace('moe', 'MoE', 1)
  done = [c for c in items if not c['skipped']]
  if not done:
    return f'{name}: nothing to compare ({items[0]["skipped"]})'
  level = done[0]['level']
  parts = [f'{name} {_verdict([c["gap_active"] for c in done], "active-matched dense", level)}']
  with_law = [c for c in done if c['gap_total'] is not None]
  if with_law:
    for key, what in (('gap_total', 'the dense law at matched total params'), ('gap_flops', 'at matched FLOPs')):
      parts.append(_verdict([c[key] for c in with_law], what, level))
    ratios = [c['n_eff_ratio']['value'] for c in with_law]
    finite = [r for r in ratios if r is not None]
    unbounded = len(ratios) - len(finite)
    if not finite:
      parts.append('N_eff unbounded (MoE below the dense floor E)')
    else:
      span = f'{min(finite):.2f}-{max(finite):.2f}x' if len(finite) > 1 else f'{finite[0]:.2f}x'
      below = f' (unbounded on {unbounded}: below the dense floor)' if unbounded else ''
      parts.append(f'N_eff = {span} active{below}')
  else:
    parts.append('fewer than 3 dense rungs: no dense law, no total/FLOP-matched gaps or N_eff')
  skipped = len(items) - len(done)
  if skipped:
    parts.append(f'{skipped} rung{"s" if skipped > 1 else ""} on one side only skipped')
  return '; '.join(parts)


def answer(comparisons: list[dict]) -> str:
  """The comparison in one line of words with numbers, one clause group per MoE architecture (' | ' between)."""
  if not comparisons:
    return 'no MoE rows: nothing to compare'
  by_arch = collections.defaultdict(list)
  for c in comparisons:
    by_arch[c['arch']].append(c)
  return ' | '.join(_arch_answer(label, items) for label, items in by_arch.items())
