"""Scaling-law fits recover known laws from noisy synthetic points."""

import numpy as np
import pytest

from slmjax import scaling


def test_power_law_fit_recovers_exponent_with_interval():
  rng = np.random.default_rng(0)
  n = np.logspace(5, 8, 10)
  true = scaling.PowerLaw(E=1.6, A=40.0, alpha=0.3, n_points=10)
  loss = true(n) * np.exp(rng.normal(0, 0.005, n.shape))
  law = scaling.fit_power_law(n, loss, n_bootstrap=50)
  assert law.alpha == pytest.approx(0.3, abs=0.05)
  assert law.E == pytest.approx(1.6, abs=0.1)
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


def test_chinchilla_fit_recovers_both_exponents():
  n, d = np.meshgrid(np.logspace(6, 8, 5), np.logspace(8, 10, 4))
  true = scaling.ChinchillaLaw(E=1.7, A=400.0, alpha=0.34, B=2000.0, beta=0.28)
  loss = true(n, d) * np.exp(np.random.default_rng(1).normal(0, 0.002, n.shape))
  law = scaling.fit_chinchilla(n.ravel(), d.ravel(), loss.ravel())
  assert law.alpha == pytest.approx(0.34, abs=0.05)
  assert law.beta == pytest.approx(0.28, abs=0.05)


def test_effective_params_inverts_the_dense_law():
  dense = scaling.PowerLaw(E=1.5, A=50.0, alpha=0.3, n_points=5)
  assert scaling.effective_params(dense, float(dense(2e6))) == pytest.approx(2e6, rel=1e-6)
  assert scaling.effective_params(dense, 1.4) == float('inf')


def test_bad_inputs():
  with pytest.raises(ValueError, match='at least 3 points'):
    scaling.fit_power_law([1e5, 1e6], [3.0, 2.5])
  with pytest.raises(ValueError, match='positive'):
    scaling.fit_power_law([1e5, 1e6, 1e7], [3.0, -2.5, 2.0])
