"""The dense-vs-MoE comparison recovers known gaps from synthetic sweeps, says "within noise" on a null sweep,
and pairing by seed narrows the interval when seeds share their luck."""

import json
import math

import numpy as np
import pytest

from slmjax import compare, scaling

RUNGS = [(64, 2), (96, 3), (128, 4), (192, 6), (256, 8)]
DENSE = scaling.PowerLaw(E=2.0, A=80.0, alpha=0.3, n_points=0)
TOKENS = 2e8
SEEDS = range(5)
OWN = 0.004  # each run's own noise (nats)
FIVE_SIGMA = -5 * math.sqrt(2 / len(SEEDS)) * OWN  # 5 standard errors of a paired mean difference over SEEDS


def sweep(gap=0.0, seeds=SEEDS, own=OWN, shared=0.0, moe_seed_shift=0, rng_seed=0, rungs=RUNGS) -> list[dict]:
  """Rows of a dense and an 'moe E=8 k=2' sweep whose true loss is DENSE(active) (+ gap for MoE); seed s of a
  rung adds the same offset (sd `shared`) to both, and every run its own noise (sd `own`)."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for d_model, n_layers in rungs:
    active = 12 * n_layers * d_model ** 2
    for s in seeds:
      offset = rng.normal(0, shared)
      base = {'d_model': d_model, 'n_layers': n_layers, 'active_params': active}
      rows.append({**base, 'arch': 'dense', 'n_experts': 0, 'top_k': 0, 'seed': s, 'total_params': active,
                   'train_flops': 6 * active * TOKENS, 'eval_loss': float(DENSE(active)) + offset + rng.normal(0, own)})
      rows.append({**base, 'arch': 'moe', 'n_experts': 8, 'top_k': 2, 'seed': s + moe_seed_shift,
                   'total_params': 4 * active, 'train_flops': 6.3 * active * TOKENS,
                   'eval_loss': float(DENSE(active)) + gap + offset + rng.normal(0, own)})
  return rows


def contains(ci, value) -> bool:
  return ci[0] <= value <= ci[1]


def test_a_five_sigma_gap_is_recovered_with_intervals_that_exclude_zero():
  result = compare.compare(sweep(gap=FIVE_SIGMA), n_bootstrap=100)
  json.dumps(result, allow_nan=False)  # plain JSON
  assert len(result) == len(RUNGS) and all(c['arch'] == 'moe E=8 k=2' and not c['skipped'] for c in result)
  for c in result:
    active = c['active_params']
    true_total = float(DENSE(active)) + FIVE_SIGMA - float(DENSE(4 * active))
    true_ratio = DENSE.inverse(float(DENSE(active)) + FIVE_SIGMA) / active
    g, t = c['gap_active'], c['gap_total']
    print(f'rung {c["d_model"]}x{c["n_layers"]}: active gap true {FIVE_SIGMA:+.4f} got {g["nats"]:+.4f} '
          f'[{g["ci"][0]:+.4f}, {g["ci"][1]:+.4f}] ({g["pct"]:+.2f}%); total gap true {true_total:+.4f} got '
          f'{t["nats"]:+.4f} [{t["ci"][0]:+.4f}, {t["ci"][1]:+.4f}]; N_eff/N true {true_ratio:.2f} got '
          f'{c["n_eff_ratio"]["value"]:.2f} [{c["n_eff_ratio"]["ci"][0]:.2f}, {c["n_eff_ratio"]["ci"][1]:.2f}]')
    assert g['method'] == 'paired t over 5 seeds'
    assert contains(g['ci'], FIVE_SIGMA) and g['ci'][1] < 0
    assert g['pct'] == pytest.approx(100 * g['nats'] / c['dense_loss'])
    assert contains(t['ci'], true_total) and t['ci'][0] > 0  # 4x the parameters: the total-matched dense wins
    assert contains(c['n_eff_ratio']['ci'], true_ratio) and c['n_eff_ratio']['ci'][0] > 1
    assert c['gap_flops']['ci'] is not None and c['gap_total']['extrapolated'] == (active * 4 > 12 * 8 * 256 ** 2)
  text = compare.answer(result)
  print(text)
  assert text.startswith('MoE E=8 k=2 beats active-matched dense on 5 of 5 rungs by ')
  assert '(95% intervals exclude zero on 5 of 5)' in text and 'N_eff = ' in text


def test_a_null_sweep_is_within_noise():
  result = compare.compare(sweep(gap=0.0), n_bootstrap=50)
  for c in result:
    assert contains(c['gap_active']['ci'], 0.0), c
  text = compare.answer(result)
  print(text)
  assert 'active-matched dense' in text and 'within noise (every 95% interval includes zero)' in text
  # Each rung's 95% interval misses zero 5% of the time: over 5 rungs, 3 of rng seeds 0-11 have one that does
  # (seed 1 here), and the text then says that 0.25 such rungs are expected by chance.
  text = compare.answer(compare.compare(sweep(gap=0.0, rng_seed=1), n_bootstrap=0))
  assert '(95% intervals exclude zero on 1 of 5, 0.25 expected by chance)' in text


def test_pairing_by_seed_narrows_the_interval_when_seeds_share_noise():
  shared = dict(gap=FIVE_SIGMA, own=0.002, shared=0.03)  # a seed's luck is 15x a run's own noise
  paired = compare.compare(sweep(**shared), n_bootstrap=0)
  unpaired = compare.compare(sweep(**shared, moe_seed_shift=100), n_bootstrap=0)  # no seed on both sides
  for p, u in zip(paired, unpaired):
    width = lambda c: c['gap_active']['ci'][1] - c['gap_active']['ci'][0]
    print(f'rung {p["d_model"]}x{p["n_layers"]}: paired width {width(p):.4f} ({p["gap_active"]["method"]}), '
          f'unpaired {width(u):.4f} ({u["gap_active"]["method"]})')
    assert p['gap_active']['method'].startswith('paired') and u['gap_active']['method'].startswith('Welch')
    assert width(p) < width(u) / 3
    assert p['gap_active']['ci'][1] < 0 < u['gap_active']['ci'][1]  # the shared luck hides the gap unpaired


def test_one_seed_gives_no_intervals_and_says_so():
  result = compare.compare(sweep(gap=FIVE_SIGMA, seeds=[0]), n_bootstrap=20)
  for c in result:
    assert c['gap_active']['ci'] is None and c['gap_total']['ci'] is None and c['n_eff_ratio']['ci'] is None
  assert 'one seed: no intervals' in compare.answer(result)


def test_rungs_on_one_side_only_are_skipped_and_counted():
  rows = [r for r in sweep(gap=FIVE_SIGMA) if not (r['arch'] == 'dense' and r['d_model'] == 64)]
  rows += [r for r in sweep(rungs=[(512, 8)]) if r['arch'] == 'dense']
  result = compare.compare(rows, n_bootstrap=20)
  skipped = {(c['d_model'], c['skipped']) for c in result if c['skipped']}
  assert skipped == {(64, 'no dense run at this rung'), (512, 'no MoE run at this rung')}
  text = compare.answer(result)
  assert 'on 4 of 4 rungs' in text and '2 rungs on one side only skipped' in text


def test_without_enough_dense_rows():
  moe_only = [r for r in sweep(gap=FIVE_SIGMA) if r['arch'] != 'dense']
  result = compare.compare(moe_only)
  assert {c['skipped'] for c in result} == {'no dense rows'}
  assert compare.answer(result) == 'MoE E=8 k=2: nothing to compare (no dense rows)'
  dense_only = [r for r in sweep() if r['arch'] == 'dense']
  assert compare.answer(compare.compare(dense_only)) == 'no MoE rows: nothing to compare'
  two_rungs = compare.compare(sweep(gap=FIVE_SIGMA, rungs=RUNGS[:2]))
  assert all(c['gap_total'] is None and c['gap_active']['ci'] is not None for c in two_rungs)
  assert 'fewer than 3 dense rungs' in compare.answer(two_rungs)


@pytest.mark.slow
def test_law_matched_intervals_cover_the_true_gap_with_two_seeds():
  """With 2 seeds a side, the total- and FLOP-matched 95% intervals hold the true gap about 95% of the time (a
  bootstrap's percentiles held it 83-86% of the time: too narrow with so few seeds)."""
  hits = []
  for rep in range(12):
    for c in compare.compare(sweep(gap=0.0, seeds=range(2), shared=OWN, rng_seed=100 + rep), n_bootstrap=60,
                             seed=rep):
      active = c['active_params']
      for gap, x in ((c['gap_total'], 4 * active), (c['gap_flops'], active * 6.3 / 6)):
        hits.append(contains(gap['ci'], float(DENSE(active)) - float(DENSE(x))))
  print(f'coverage {np.mean(hits):.2f} of {len(hits)} intervals')
  assert np.mean(hits) >= 0.9
