"""Scaling-law fits recover known laws from noisy synthetic points."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import optimize

from slmjax import scaling


NOISE = 0.005  # multiplicative lognormal noise on every synthetic loss (0.5%)


def noisy(loss, seed: int = 0):
  return loss * np.exp(np.random.default_rng(seed).normal(0, NOISE, np.shape(loss)))


def report(name: str, true: dict, law, ci_fields=()) -> None:
  """One line per parameter (shown by pytest -s): true, recovered, relative error, interval."""
  for key, value in true.items():
    got = getattr(law, key)
    ci = getattr(law, f'{key}_ci', None)
    ci = f' [{ci[0]:.4g}, {ci[1]:.4g}]' if ci else ''
    print(f'{name:<10} {key:<6} true {value:<8.4g} recovered {got:<8.4g} ({got / value - 1:+.1%}){ci}')


def test_power_law_fit_recovers_exponent_with_interval():
  n = np.logspace(5, 8, 10)
  true = scaling.PowerLaw(E=1.6, A=40.0, alpha=0.3, n_points=10)
  law = scaling.fit_power_law(n, noisy(true(n)), n_bootstrap=50)
  report('L(N)', {'alpha': 0.3, 'E': 1.6, 'A': 40.0}, law)
  assert law.alpha == pytest.approx(0.3, rel=0.1)
  assert law.E == pytest.approx(1.6, rel=0.1)
  lo, hi = law.alpha_ci
  assert lo <= 0.3 <= hi and hi - lo < 0.3
  assert 'N^-' in law.label()


def test_power_law_fit_is_robust_to_one_outlier():
  n = np.logspace(5, 8, 8)
  true = scaling.PowerLaw(E=2.0, A=30.0, alpha=0.35, n_points=8)
  loss = true(n)
  loss[3] *= 1.3  # one diverged run
  law = scaling.fit_power_law(n, loss, n_bootstrap=0)
  assert law.alpha == pytest.approx(0.35, abs=0.05)


CHINCHILLA = scaling.ChinchillaLaw(E=1.7, A=400.0, alpha=0.34, B=2000.0, beta=0.28)


def test_chinchilla_fit_recovers_both_exponents_with_intervals():
  n, d = np.meshgrid(np.logspace(6, 8, 5), np.logspace(8, 10, 4))  # a sweep's grid: 5 sizes x 4 token counts
  law = scaling.fit_chinchilla(n.ravel(), d.ravel(), noisy(CHINCHILLA(n, d)).ravel(), n_bootstrap=20)
  report('L(N, D)', {'alpha': 0.34, 'beta': 0.28, 'E': 1.7}, law)
  assert law.alpha == pytest.approx(0.34, rel=0.1)
  assert law.beta == pytest.approx(0.28, rel=0.1)
  for (lo, hi), value in ((law.alpha_ci, law.alpha), (law.beta_ci, law.beta)):
    assert lo <= value <= hi and hi - lo < 0.2
  assert 'D^-' in law.label() and law.n_points == 20


def test_optimal_allocation_is_the_minimum_of_the_isoflop_curve():
  for compute in (1e18, 1e21):
    n_opt, d_opt = scaling.optimal_allocation(CHINCHILLA, compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute, rel=1e-9)
    best = optimize.minimize_scalar(lambda log_n: float(scaling.isoflop_curve(CHINCHILLA, compute, np.exp(log_n))),
                                    bounds=(np.log(n_opt) - 5, np.log(n_opt) + 5), method='bounded',
                                    options={'xatol': 1e-10})
    assert np.exp(best.x) == pytest.approx(n_opt, rel=1e-4)
    grid = np.geomspace(n_opt / 100, n_opt * 100, 401)  # the curve is convex in log N around its minimum
    assert grid[np.argmin(scaling.isoflop_curve(CHINCHILLA, compute, grid))] == pytest.approx(n_opt, rel=0.02)
  n_opt, d_opt = scaling.optimal_allocation(CHINCHILLA, np.array([1e18, 1e21]))
  assert n_opt.shape == d_opt.shape == (2,) and n_opt[1] > n_opt[0]


MOE_LAW = scaling.MoELaw(a=-0.075, b=-0.09, c=0.012, d=1.0, n_ref=1e8, e_start=1.0, e_max=300.0, n_points=0)


def test_moe_law_fit_recovers_coefficients_across_expert_counts():
  n, e = (v.ravel() for v in np.meshgrid(np.logspace(6, 9, 5), [1, 2, 4, 8, 16, 32, 64]))
  law = scaling.fit_moe_law(n, e, noisy(MOE_LAW(n, e)), n_bootstrap=100)
  report('MoE joint', {'a': -0.075, 'b': -0.09, 'c': 0.012, 'e_max': 300.0, 'd': 1.0}, law)
  for key in ('a', 'b', 'c'):
    assert getattr(law, key) == pytest.approx(getattr(MOE_LAW, key), rel=0.1), key
    lo, hi = getattr(law, f'{key}_ci')
    assert lo <= getattr(law, key) <= hi
  assert law.n_ref == 1e8 and law.e_max_ci is not None
  assert float(law(1e7, 8)) == pytest.approx(float(MOE_LAW(1e7, 8)), rel=0.01)
  assert 'log E^' in law.label()


def test_moe_law_with_few_expert_counts_does_not_saturate():
  n, e = (v.ravel() for v in np.meshgrid(np.logspace(6, 8, 4), [1, 8]))
  true = dataclasses.replace(MOE_LAW, e_max=math.inf)
  law = scaling.fit_moe_law(n, e, noisy(true(n, e)), n_ref=1e8, n_bootstrap=0)
  assert law.e_max == math.inf and law.e_max_ci is None
  assert law.b == pytest.approx(true.b, rel=0.1)


def test_saturating_expert_count():
  assert scaling.e_hat(1, e_start=2.0, e_max=100.0) == pytest.approx(2.0)
  assert scaling.e_hat(1e9, e_start=2.0, e_max=100.0) == pytest.approx(100.0, rel=1e-6)
  np.testing.assert_allclose(scaling.e_hat([1, 8, 64]), [1, 8, 64])


def test_effective_params_inverts_the_dense_law():
  dense = scaling.PowerLaw(E=1.5, A=50.0, alpha=0.3, n_points=5)
  assert scaling.effective_params(dense, float(dense(2e6))) == pytest.approx(2e6, rel=1e-6)
  assert scaling.effective_params(dense, 1.4) == float('inf')


def test_bad_inputs():
  with pytest.raises(ValueError, match='at least 3 points'):
    scaling.fit_power_law([1e5, 1e6], [3.0, 2.5])
  with pytest.raises(ValueError, match='positive'):
    scaling.fit_power_law([1e5, 1e6, 1e7], [3.0, -2.5, 2.0])
  with pytest.raises(ValueError, match='2 distinct token budgets'):
    scaling.fit_chinchilla([1e6, 2e6, 4e6, 8e6, 1e7], [1e9] * 5, [3.0, 2.9, 2.8, 2.7, 2.6])
  with pytest.raises(ValueError, match='2 expert counts'):
    scaling.fit_moe_law([1e6, 2e6, 4e6, 8e6, 1e7], [1] * 5, [3.0, 2.9, 2.8, 2.7, 2.6])
  with pytest.raises(ValueError, match='at least 1'):
    scaling.fit_moe_law([1e6, 2e6, 4e6, 8e6, 1e7], [0, 1, 8, 8, 8], [3.0, 2.9, 2.8, 2.7, 2.6])
  with pytest.raises(ValueError, match='positive compute'):
    scaling.optimal_allocation(CHINCHILLA, 0.0)
