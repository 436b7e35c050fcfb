"""Scaling-law fits: L(N) = E + A N^-alpha and L(N, D) = E + A N^-alpha + B D^-beta, with bootstrap intervals.

Fitted as Hoffmann et al. 2022 (Chinchilla, appendix D.2): minimise the Huber loss (delta 1e-3) between the
predicted and observed log-loss, with the prediction written as a log-sum-exp of log-terms so every parameter is
unconstrained (A = exp(a), E = exp(e)), by L-BFGS. Starting points: for each exponent on a grid the law is linear
in its coefficients (E, A, B), so non-negative least squares gives them at once; the best few grid points start
L-BFGS (cheaper and more reliable than Chinchilla's blind grid of starts).
Confidence intervals come from refitting on bootstrap resamples of the points.
The MoE "effective parameter count" (Clark et al. 2022, "Unified scaling laws for routed language models") is the
dense size whose fitted loss equals the MoE model's loss: N_eff = (A / (L - E))^(1 / alpha).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(N) = E + A * N^-alpha, with bootstrap (lo, hi) intervals on each parameter (None when not bootstrapped)."""
  E: float
  A: float
  alpha: float
  n_points: int
  alpha_ci: tuple[float, float] | None = None
  E_ci: tuple[float, float] | None = None

  def __call__(self, n):
    return self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha

  def inverse(self, loss: float) -> float:
    """The N whose predicted loss is `loss` (inf when loss <= E: the law never gets there)."""
    if loss <= self.E:
      return math.inf
    return (self.A / (loss - self.E)) ** (1.0 / self.alpha)

  def label(self) -> str:
    ci = f' [{self.alpha_ci[0]:.2f}, {self.alpha_ci[1]:.2f}]' if self.alpha_ci else ''
    return f'L = {self.E:.2f} + {self.A:.3g} N^-{self.alpha:.2f}{ci}'


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
  """L(N, D) = E + A N^-alpha + B D^-beta."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float

  def __call__(self, n, d):
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta


def _huber_objective(log_terms, log_loss):
  """Huber loss of log-sum-exp(log_terms) against log_loss, and its gradient with respect to each log-term.

  Returns (value, d value / d log_terms[i] for each i): the chain rule through log-sum-exp is a softmax.
  """
  predicted = special.logsumexp(log_terms, axis=0)
  residual = predicted - log_loss
  d_residual = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
  weights = np.exp(np.asarray(log_terms) - predicted)
  return float(np.sum(special.huber(HUBER_DELTA, residual))), d_residual * weights


def _best_fit(objective, grid) -> np.ndarray:
  """Minimise `objective` (returning value and gradient) by L-BFGS from every start in `grid`; keep the best."""
  best_x, best_f = None, math.inf
  for x0 in grid:
    result = optimize.minimize(objective, np.array(x0, dtype=float), jac=True, method='L-BFGS-B',
                               options={'maxiter': 100, 'ftol': 1e-12, 'gtol': 1e-8})
    if np.isfinite(result.fun) and result.fun < best_f:
      best_x, best_f = result.x, result.fun
  if best_x is None:
    raise ValueError('the scaling-law fit did not converge from any starting point')
  return best_x


EXPONENT_GRID = np.linspace(0.02, 1.5, 38)
N_REFINED = 3


def _linear_starts(sizes: list[np.ndarray], loss: np.ndarray, objective, exponent_grid) -> list:
  """Starting points [a1, alpha1, (a2, alpha2,) e]: for each exponent tuple on the grid, NNLS gives the
  coefficients of L = E + sum_i A_i x_i^-alpha_i; the `N_REFINED` best by objective value are returned."""
  log_max = [np.log(np.max(x)) for x in sizes]
  starts = []
  for exponents in exponent_grid:
    # Features scaled to order one (x / max x) keep NNLS well conditioned; the scale goes back into a_i below.
    features = [(x / np.max(x)) ** -alpha for x, alpha in zip(sizes, exponents)]
    coefs, _ = optimize.nnls(np.column_stack([np.ones_like(loss), *features]), loss)
    log_coefs = np.log(np.maximum(coefs, 1e-8 * np.max(loss)))
    x0 = []
    for log_a, alpha, scale in zip(log_coefs[1:], exponents, log_max):
      x0 += [log_a + alpha * scale, alpha]
    x0 = np.array(x0 + [log_coefs[0]])
    starts.append((objective(x0)[0], x0))
  starts.sort(key=lambda item: item[0])
  return [x0 for _, x0 in starts[:N_REFINED]]


def _fit_power_law_once(n: np.ndarray, loss: np.ndarray, grid=None) -> PowerLaw:
  log_n, log_loss = np.log(n), np.log(loss)

  def objective(params):
    a, alpha, e = params
    value, (g_a, g_e) = _huber_objective([a - alpha * log_n, np.full_like(log_n, e)], log_loss)
    return value, np.array([g_a.sum(), -(g_a * log_n).sum(), g_e.sum()])

  if grid is None:
    grid = _linear_starts([n], loss, objective, [(alpha,) for alpha in EXPONENT_GRID])
  a, alpha, e = _best_fit(objective, grid)
  return PowerLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), n_points=len(n))


def fit_power_law(n, loss, n_bootstrap: int = 100, seed: int = 0, ci: float = 0.9) -> PowerLaw:
  """Fit L(N) = E + A N^-alpha to points (n, loss); bootstrap a `ci` interval on alpha and E."""
  n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
  if len(n) < 3:
    raise ValueError(f'a power-law fit needs at least 3 points, got {len(n)}')
  if np.any(n <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
    raise ValueError('power-law fit needs positive sizes and positive finite losses')
  law = _fit_power_law_once(n, loss)
  if n_bootstrap <= 0 or len(set(n.tolist())) < 3:
    return law
  rng = np.random.default_rng(seed)
  alphas, es = [], []
  # Resamples start from the full fit: they are near it, and a grid per resample would cost n_bootstrap fits.
  boot_grid = [(math.log(law.A), law.alpha, math.log(law.E))]
  for _ in range(n_bootstrap):
    idx = rng.integers(0, len(n), len(n))
    if len(set(n[idx].tolist())) < 3:
      continue  # a resample with fewer than 3 distinct sizes cannot pin down 3 parameters
    boot = _fit_power_law_once(n[idx], loss[idx], boot_grid)
    alphas.append(boot.alpha)
    es.append(boot.E)
  q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
  return dataclasses.replace(law, alpha_ci=tuple(float(v) for v in np.percentile(alphas, q)),
                             E_ci=tuple(float(v) for v in np.percentile(es, q)))


def fit_chinchilla(n, d, loss) -> ChinchillaLaw:
  """Fit L(N, D) = E + A N^-alpha + B D^-beta (needs several token budgets D, at least 5 points)."""
  n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
  if len(n) < 5 or len(set(d.tolist())) < 2:
    raise ValueError('the L(N, D) fit needs at least 5 points and at least 2 distinct token budgets')
  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)

  def objective(params):
    a, alpha, b, beta, e = params
    value, (g_a, g_b, g_e) = _huber_objective(
        [a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], log_loss)
    return value, np.array([g_a.sum(), -(g_a * log_n).sum(), g_b.sum(), -(g_b * log_d).sum(), g_e.sum()])

  exponents = [(alpha, beta) for alpha in EXPONENT_GRID[::2] for beta in EXPONENT_GRID[::2]]
  grid = _linear_starts([n, d], loss, objective, exponents)
  a, alpha, b, beta, e = _best_fit(objective, grid)
  return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)),
                       beta=float(beta))


def effective_params(dense_law: PowerLaw, loss: float) -> float:
  """Dense parameter count whose fitted loss equals `loss` (Clark et al. 2022); inf below the dense floor E."""
  return dense_law.inverse(loss)
