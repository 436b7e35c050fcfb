"""Scaling-law fits: L(N) = E + A N^-alpha, L(N, D) = E + A N^-alpha + B D^-beta, and the joint dense/MoE law of
Clark et al. 2022, with bootstrap intervals; the compute-optimal frontier of a fitted L(N, D) and measured
isoFLOP profiles from an (N, D) grid.

Fitted as Hoffmann et al. 2022 (Chinchilla, appendix D.2): minimise the Huber loss (delta 1e-3) between the
predicted and observed log-loss, with the prediction written as a log-sum-exp of log-terms so every parameter is
unconstrained (A = exp(a), E = exp(e)), by BFGS (plain numpy: on a busy machine scipy's L-BFGS-B spent 10-20x as
long in BLAS threads on these few-parameter problems, same answers). Starting points: for each exponent on a grid the
law is linear in its coefficients (E, A, B), so non-negative least squares gives them at once; the best few grid
points start BFGS (cheaper and more reliable than Chinchilla's blind grid of starts).
Confidence intervals come from refitting on bootstrap resamples of the points, each refit started at the full fit.
The MoE "effective parameter count" (Clark et al. 2022, "Unified scaling laws for routed language models") is the
dense size whose fitted loss equals the MoE model's loss: N_eff = (A / (L - E))^(1 / alpha).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3


def _ci_text(ci) -> str:
  return f' [{ci[0]:.2f}, {ci[1]:.2f}]' if ci else ''


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

  def label(self, x: str = 'N') -> str:
    """The law as text, in the variable `x` (N for parameters, C for FLOPs)."""
    return f'L = {self.E:.2f} + {self.A:.3g} {x}^-{self.alpha:.2f}{_ci_text(self.alpha_ci)}'


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
  """L(N, D) = E + A N^-alpha + B D^-beta, with bootstrap (lo, hi) intervals (None when not bootstrapped)."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float
  n_points: int = 0
  alpha_ci: tuple[float, float] | None = None
  beta_ci: tuple[float, float] | None = None
  E_ci: tuple[float, float] | None = None
  n_exponent_ci: tuple[float, float] | None = None
  d_exponent_ci: tuple[float, float] | None = None

  @property
  def n_exponent(self) -> float:
    """a in N_opt ~ C^a on the compute-optimal frontier: beta / (alpha + beta) (Hoffmann et al. 2022, eq. 4)."""
    return self.beta / (self.alpha + self.beta)

  @property
  def d_exponent(self) -> float:
    """b in D_opt ~ C^b on the compute-optimal frontier: alpha / (alpha + beta); a + b = 1."""
    return self.alpha / (self.alpha + self.beta)

  def __call__(self, n, d):
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

  def label(self) -> str:
    return (f'L = {self.E:.2f} + {self.A:.3g} N^-{self.alpha:.2f}{_ci_text(self.alpha_ci)}'
            f' + {self.B:.3g} D^-{self.beta:.2f}{_ci_text(self.beta_ci)}')


def _huber_objective(log_terms, log_loss):
  """Huber loss of log-sum-exp(log_terms) against log_loss, and its gradient with respect to each log-term.

  Returns (value, d value / d log_terms[i] for each i): the chain rule through log-sum-exp is a softmax.
  """
  # numpy's logaddexp ufunc, not scipy.special.logsumexp: the same values, without the array-API dispatch that
  # was half the time of every fit (a bootstrap runs thousands).
  log_terms = np.asarray(log_terms, dtype=float)
  predicted = np.logaddexp.reduce(log_terms, axis=0)
  residual = predicted - log_loss
  d_residual = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
  weights = np.exp(log_terms - predicted)
  return float(np.sum(special.huber(HUBER_DELTA, residual))), d_residual * weights


def _best_fit(objective, grid) -> np.ndarray:
  """Minimise `objective` (returning value and gradient) by BFGS from every start in `grid`; keep the best."""
  best_x, best_f = None, math.inf
  for x0 in grid:
    result = optimize.minimize(objective, np.array(x0, dtype=float), jac=True, method='BFGS',
                               options={'maxiter': 100, 'gtol': 1e-8})
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


def _intervals(refit: Callable[[np.ndarray], object], n_points: int, usable: Callable[[np.ndarray], bool],
               fields: tuple[str, ...], n_bootstrap: int, seed: int, ci: float) -> dict:
  """{'<field>_ci': (lo, hi)}: the central `ci` range of each field of `refit(indices)` over bootstrap resamples
  of the points; resamples that cannot identify the law (`usable` false) are skipped; {} when none is usable."""
  rng = np.random.default_rng(seed)
  values = {f: [] for f in fields}
  for _ in range(n_bootstrap):
    idx = rng.integers(0, n_points, n_points)
    if usable(idx):
      boot = refit(idx)
      for f in fields:
        values[f].append(getattr(boot, f))
  if not values[fields[0]]:
    return {}
  return {f'{f}_ci': interval(values[f], ci) for f in fields}


def interval(values, ci: float) -> tuple[float, float]:
  """The central `ci` range of bootstrap `values`: sample quantiles, not interpolated when some value is inf
  (E_max, N_eff: interpolating inf gives nan)."""
  values = np.asarray(values, dtype=float)
  method = 'linear' if np.all(np.isfinite(values)) else 'inverted_cdf'
  return tuple(float(v) for v in np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2], method=method))


def _distinct(*columns: np.ndarray) -> int:
  """How many distinct points (rows of the columns side by side)."""
  return len(set(zip(*(c.tolist() for c in columns))))


def _check_points(loss: np.ndarray, *sizes: np.ndarray) -> None:
  if np.any([np.any(x <= 0) for x in sizes]) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
    raise ValueError('scaling-law fits need positive sizes and positive finite losses; drop failed runs first')


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


def fit_power_law(n, loss, n_bootstrap: int = 100, seed: int = 0, ci: float = 0.9,
                  start: PowerLaw | None = None) -> PowerLaw:
  """Fit L(N) = E + A N^-alpha to points (n, loss); bootstrap a `ci` interval on alpha and E.

  `start`: begin BFGS at this law instead of the exponent grid (fast refits of data near a known fit)."""
  n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
  if len(n) < 3:
    raise ValueError(f'a power-law fit needs at least 3 points, got {len(n)}')
  _check_points(loss, n)
  grid = None if start is None else [(math.log(start.A), start.alpha, math.log(start.E))]
  law = _fit_power_law_once(n, loss, grid)
  if n_bootstrap <= 0 or _distinct(n) < 3:
    return law
  boot_grid = [(math.log(law.A), law.alpha, math.log(law.E))]
  return dataclasses.replace(law, **_intervals(
      lambda idx: _fit_power_law_once(n[idx], loss[idx], boot_grid), len(n),
      lambda idx: _distinct(n[idx]) >= 3,  # fewer than 3 distinct sizes cannot pin down 3 parameters
      ('alpha', 'E'), n_bootstrap, seed, ci))


def _fit_chinchilla_once(n: np.ndarray, d: np.ndarray, loss: np.ndarray, grid=None) -> ChinchillaLaw:
  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)

  def objective(params):
    a, alpha, b, beta, e = params
    value, (g_a, g_b, g_e) = _huber_objective(
        [a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], log_loss)
    return value, np.array([g_a.sum(), -(g_a * log_n).sum(), g_b.sum(), -(g_b * log_d).sum(), g_e.sum()])

  if grid is None:
    exponents = [(alpha, beta) for alpha in EXPONENT_GRID[::2] for beta in EXPONENT_GRID[::2]]
    grid = _linear_starts([n, d], loss, objective, exponents)
  a, alpha, b, beta, e = _best_fit(objective, grid)
  return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)),
                       beta=float(beta), n_points=len(n))


def fit_chinchilla(n, d, loss, n_bootstrap: int = 100, seed: int = 0, ci: float = 0.9) -> ChinchillaLaw:
  """Fit L(N, D) = E + A N^-alpha + B D^-beta (needs several token budgets D, at least 5 points); bootstrap a
  `ci` interval on alpha, beta, E and the frontier exponents (`n_exponent`, `d_exponent`: each resample's own,
  so their interval carries the correlation of alpha and beta)."""
  n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
  if len(n) < 5 or _distinct(d) < 2:
    raise ValueError('the L(N, D) fit needs at least 5 points and at least 2 distinct token budgets; '
                     'add runs at another token count')
  _check_points(loss, n, d)
  law = _fit_chinchilla_once(n, d, loss)
  if n_bootstrap <= 0:
    return law
  boot_grid = [(math.log(law.A), law.alpha, math.log(law.B), law.beta, math.log(law.E))]
  return dataclasses.replace(law, **_intervals(
      lambda idx: _fit_chinchilla_once(n[idx], d[idx], loss[idx], boot_grid), len(n),
      lambda idx: _distinct(n[idx]) >= 2 and _distinct(d[idx]) >= 2 and _distinct(n[idx], d[idx]) >= 5,
      ('alpha', 'beta', 'E', 'n_exponent', 'd_exponent'), n_bootstrap, seed, ci))


def optimal_allocation(law: ChinchillaLaw, compute):
  """Compute-optimal (N_opt, D_opt) for training compute C = 6 N D under a fitted L(N, D) (Hoffmann et al.
  2022, eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))^(1/(alpha+beta)). Floats for a scalar `compute`, arrays for an array."""
  c6 = np.asarray(compute, dtype=float) / 6
  if np.any(c6 <= 0):
    raise ValueError('optimal_allocation needs positive compute (FLOPs)')
  total = law.alpha + law.beta
  g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / total)
  n_opt, d_opt = g * c6 ** (law.beta / total), c6 ** (law.alpha / total) / g
  return (float(n_opt), float(d_opt)) if n_opt.ndim == 0 else (n_opt, d_opt)


def isoflop_curve(law: ChinchillaLaw, compute: float, n_grid) -> np.ndarray:
  """Predicted loss at each model size in `n_grid` trained on the tokens a fixed compute buys: D = C / (6 N)."""
  n_grid = np.asarray(n_grid, dtype=float)
  return law(n_grid, compute / (6 * n_grid))


def isoflop_points(n, d, loss, compute: float) -> tuple[np.ndarray, np.ndarray]:
  """Measured isoFLOP profile at training compute C = 6 N D: for each model size N whose runs bracket
  D = C / (6 N), the loss interpolated linearly in log D between that size's nearest two token counts (runs of
  one (N, D) averaged first, e.g. over seeds). WSD branches give each size several D, so one run per size gives
  the profiles of Hoffmann et al.'s approach 2 without a run per compute level. Returns (sizes, losses), sorted."""
  n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
  sizes, losses = [], []
  for size in np.unique(n):
    here = n == size
    d_here = np.unique(d[here])
    mean = np.array([loss[here & (d == x)].mean() for x in d_here])
    target = compute / (6 * size)
    if len(d_here) >= 2 and d_here[0] <= target <= d_here[-1]:
      sizes.append(size)
      losses.append(float(np.interp(np.log(target), np.log(d_here), mean)))
  return np.array(sizes), np.array(losses)


def isoflop_levels(n, d, count: int = 4) -> np.ndarray:
  """`count` compute levels, log-spaced over the range where at least two sizes' runs bracket D = C / (6N) (so
  each level's measured profile has two points or more); empty when no such range exists."""
  n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
  spans = sorted((6 * size * d[n == size].min(), 6 * size * d[n == size].max()) for size in np.unique(n)
                 if len(np.unique(d[n == size])) >= 2)
  edges = sorted({c for span in spans for c in span})
  covered = [c for c in edges if sum(lo <= c <= hi for lo, hi in spans) >= 2]
  if len(covered) < 2 or covered[0] >= covered[-1]:
    return np.array([])
  return np.geomspace(covered[0], covered[-1], count)


E_MAX_GRID = np.concatenate([np.geomspace(2, 1e4, 40), [math.inf]])
MIN_EXPERT_COUNTS_FOR_E_MAX = 4  # with fewer distinct expert counts the saturation E_max is not identified


def e_hat(e, e_start: float = 1.0, e_max: float = math.inf):
  """Clark et al.'s saturating expert count: 1/E_hat = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max.

  E_hat(1) = E_start, and E_hat -> E_max as E grows; E_start = 1 and E_max = inf give E_hat = E."""
  e = np.asarray(e, dtype=float)
  return 1 / (1 / (e - 1 + 1 / (1 / e_start - 1 / e_max)) + 1 / e_max)


@dataclasses.dataclass(frozen=True)
class MoELaw:
  """The joint dense/MoE law of Clark et al. 2022 ("Unified scaling laws for routed language models"), bilinear
  in log N and the saturating log E_hat: log L = a log(N/n_ref) + b log E_hat + c log(N/n_ref) log E_hat + d,
  N the active (dense) parameter count and E the expert count (1 for dense). a is the dense exponent (negative),
  b the gain per e-fold of experts at N = n_ref, c > 0 when that gain shrinks with size. Intervals are bootstrap
  (lo, hi), None when not bootstrapped."""
  a: float
  b: float
  c: float
  d: float
  n_ref: float
  n_points: int
  e_start: float = 1.0
  e_max: float = math.inf
  a_ci: tuple[float, float] | None = None
  b_ci: tuple[float, float] | None = None
  c_ci: tuple[float, float] | None = None
  e_max_ci: tuple[float, float] | None = None

  def __call__(self, n, e):
    return np.exp(_moe_features(np.asarray(n, dtype=float), np.asarray(e, dtype=float), self.n_ref,
                                self.e_start, self.e_max) @ np.array([self.a, self.b, self.c, self.d]))

  def label(self) -> str:
    ci = lambda v: f' [{v[0]:.3f}, {v[1]:.3f}]' if v else ''
    return (f'log L = {self.a:.3f}{ci(self.a_ci)} log(N/{self.n_ref:.0e}) {self.b:+.3f}{ci(self.b_ci)} log E^ '
            f'{self.c:+.4f}{ci(self.c_ci)} log(N/{self.n_ref:.0e}) log E^ {self.d:+.3f} '
            f'(E_start {self.e_start:g}, E_max {self.e_max:.3g})')


def _moe_features(n, e, n_ref, e_start, e_max) -> np.ndarray:
  """Columns [log(N/n_ref), log E_hat, their product, 1]: the joint law is linear in (a, b, c, d)."""
  x, y = np.log(n / n_ref), np.log(e_hat(e, e_start, e_max))
  x, y = np.broadcast_arrays(x, y)
  return np.stack([x, y, x * y, np.ones_like(x)], axis=-1)


def _huber_linear(features: np.ndarray, target: np.ndarray, theta: np.ndarray, steps: int = 200) -> np.ndarray:
  """Minimise the Huber loss of features @ theta - target by iteratively reweighted least squares (weights
  delta / max(|r|, delta)): each step lowers the loss, and the law being linear, there is no start to choose."""
  for _ in range(steps):
    weight = np.sqrt(HUBER_DELTA / np.maximum(np.abs(features @ theta - target), HUBER_DELTA))
    new = np.linalg.lstsq(features * weight[:, None], target * weight, rcond=None)[0]
    if np.max(np.abs(new - theta)) < 1e-12:
      return new
    theta = new
  return theta


def _fit_moe_law_once(n, e, loss, n_ref, e_start, e_maxes) -> MoELaw:
  """For each E_max in `e_maxes` least squares gives (a, b, c, d); the E_max whose fit has the lowest Huber loss
  of log-loss is refined on that loss (as the other fits)."""
  log_loss = np.log(loss)
  best = None
  for e_max in e_maxes:
    features = _moe_features(n, e, n_ref, e_start, e_max)
    theta = np.linalg.lstsq(features, log_loss, rcond=None)[0]
    value = np.sum(special.huber(HUBER_DELTA, features @ theta - log_loss))
    if best is None or value < best[0]:
      best = (value, e_max, features, theta)
  _, e_max, features, theta = best
  a, b, c, d = _huber_linear(features, log_loss, theta)
  return MoELaw(a=float(a), b=float(b), c=float(c), d=float(d), n_ref=n_ref, e_start=e_start, e_max=float(e_max),
                n_points=len(n))


def fit_moe_law(n, e, loss, e_max: float | None = None, e_start: float = 1.0, n_ref: float | None = None,
                n_bootstrap: int = 100, seed: int = 0, ci: float = 0.9) -> MoELaw:
  """Fit Clark et al.'s joint law to runs of several sizes `n` (active parameters) and expert counts `e` (1 for
  dense); bootstrap a `ci` interval on a, b, c (and E_max when fitted).

  E_start is fixed (default 1: dense is the E = 1 slice, log L = a log(N/n_ref) + d). `e_max=None` fits E_max on
  a grid (E_MAX_GRID, inf included) when there are at least 4 distinct expert counts, else takes E_max = inf (no
  saturation, E_hat = E): fewer counts cannot tell saturation from the interaction c. `n_ref` (default: the
  power of ten nearest the sizes' geometric mean) keeps b the expert gain at a size inside the data."""
  n, e, loss = (np.asarray(v, dtype=float) for v in (n, e, loss))
  if len(n) < 5 or _distinct(n) < 2 or _distinct(e) < 2:
    raise ValueError('the joint MoE law needs at least 5 points over at least 2 sizes and 2 expert counts '
                     '(include dense runs as e = 1)')
  _check_points(loss, n)
  if np.any(e < 1):
    raise ValueError('expert counts must be at least 1 (pass e = 1 for dense runs)')
  n_ref = n_ref or float(10 ** round(np.mean(np.log10(n))))
  fit_e_max = e_max is None and _distinct(e) >= MIN_EXPERT_COUNTS_FOR_E_MAX
  e_maxes = E_MAX_GRID if fit_e_max else [math.inf if e_max is None else e_max]
  law = _fit_moe_law_once(n, e, loss, n_ref, e_start, e_maxes)
  if n_bootstrap <= 0:
    return law
  intervals = _intervals(
      lambda idx: _fit_moe_law_once(n[idx], e[idx], loss[idx], n_ref, e_start,
                                    e_maxes if _distinct(e[idx]) >= MIN_EXPERT_COUNTS_FOR_E_MAX else [law.e_max]),
      len(n), lambda idx: _distinct(n[idx]) >= 2 and _distinct(e[idx]) >= 2 and _distinct(n[idx], e[idx]) >= 4,
      ('a', 'b', 'c', 'e_max') if fit_e_max else ('a', 'b', 'c'), n_bootstrap, seed, ci)
  return dataclasses.replace(law, **intervals)


def effective_params(dense_law: PowerLaw, loss: float) -> float:
  """Dense parameter count whose fitted loss equals `loss` (Clark et al. 2022); inf below the dense floor E."""
  return dense_law.inverse(loss)
