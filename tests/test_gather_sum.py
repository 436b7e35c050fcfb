"""The gather-sum calls (slmjax/kernels/gather_sum.py and .cc) behind slmjax/dispatch/rows.py's combine_rows and
sum_rows: the same values and gradients as XLA's gathers, dropped assignments and empty rows included, taken only
where they run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax.dispatch import rows
from slmjax.kernels import gather_sum
from own_kernels import floor_call_fixtures

X, A, N, D = 600, 3, 2000, 32  # over 256 rows: several tasks each way


built, small_f32_taken = floor_call_fixtures(gather_sum, 'gather-sum call')


def _problem(dtype, seed=0):
  """Buffer rows, gates, and the maps between them: some assignments dropped (dest >= N), some rows empty."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(N)
  dest_XA = perm[:X * A].reshape(X, A).astype(np.int32)
  dest_XA[::7, 1] = N + 3  # dropped
  asg_N = np.full(N, X * A, np.int32)  # empty rows hold X * A
  kept = dest_XA.reshape(-1) < N
  asg_N[dest_XA.reshape(-1)[kept]] = np.arange(X * A, dtype=np.int32)[kept]
  ys = jnp.asarray(rng.normal(size=(N, D)), dtype)
  weight_XA = jnp.asarray(rng.uniform(0.1, 1.0, size=(X, A)), dtype)
  return ys, weight_XA, jnp.asarray(dest_XA), jnp.asarray(asg_N)


def _traced_anew(fn):
  """fn jitted afresh: jax.jit(fn) twice shares one trace cache, which would keep the first path taken."""
  return jax.jit(lambda *args: fn(*args))


def _combine(ys, weight_XA, dest_XA, asg_N, dy_XD):
  """combine_rows' output and its cotangents of ys and the weights under dy_XD."""
  y, vjp = jax.vjp(lambda y_ND, w_XA: rows.combine_rows((y_ND,), w_XA, dest_XA, (asg_N,)), ys, weight_XA)
  return (y, *vjp(dy_XD))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_combine_matches_xlas_gathers(dtype, monkeypatch):
  ys, weight_XA, dest_XA, asg_N = _problem(dtype)
  dy_XD = jnp.asarray(np.random.default_rng(1).normal(size=(X, D)), dtype)
  assert rows._one_call((ys,), weight_XA)
  got = _traced_anew(_combine)(ys, weight_XA, dest_XA, asg_N, dy_XD)
  monkeypatch.setattr(gather_sum, 'fits', lambda *a: False)
  want = _traced_anew(_combine)(ys, weight_XA, dest_XA, asg_N, dy_XD)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2  # XLA rounds each bf16 product and sum, the call once
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)
  y, dys, dweight = (np.asarray(a, np.float32) for a in got)
  assert np.all(y[::7] != 0) and np.all(dweight[::7, 1] == 0)  # dropped: no term, no gradient
  assert np.all(dys[np.asarray(asg_N) == X * A] == 0)  # empty rows get no cotangent


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sum_rows_matches_xlas_gathers(dtype, monkeypatch):
  ys, _, dest_XA, _ = _problem(dtype, seed=2)
  got = _traced_anew(rows.sum_rows)((ys,), dest_XA)
  monkeypatch.setattr(gather_sum, 'fits', lambda *a: False)
  want = _traced_anew(rows.sum_rows)((ys,), dest_XA)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
  ys32 = np.asarray(ys, np.float32)
  kept_rows = ys32[np.asarray(dest_XA[7, 0])] + ys32[np.asarray(dest_XA[7, 2])]  # its second one is dropped
  np.testing.assert_allclose(np.asarray(got[7], np.float32), kept_rows, rtol=2e-2, atol=2e-2)


def test_taken_only_where_the_calls_run(monkeypatch):
  ys = jnp.zeros((N, D), jnp.bfloat16)
  assert gather_sum.fits(ys)
  assert not gather_sum.fits(jnp.zeros((N, 24), jnp.float32))  # width not a multiple of 16
  assert not gather_sum.fits(jnp.zeros((N, D), jnp.float16))
  assert not rows._one_call((ys, ys), jnp.zeros((X, A), jnp.bfloat16))  # segments: XLA's gathers
  assert not rows._one_call((ys,), jnp.zeros((X, A), jnp.float32))  # weights of another dtype
  monkeypatch.setattr(gather_sum, 'MIN_F32_ELEMENTS', 2 ** 17)  # the default: small f32 buffers stay in XLA
  assert not gather_sum.fits(jnp.zeros((2048, 32))) and gather_sum.fits(jnp.zeros((4096, 32)))
  assert gather_sum.fits(jnp.zeros((2048, 32), jnp.bfloat16))


def test_wrong_width_is_refused_by_the_call():
  """The handler checks what `fits` promises: a width that is not a multiple of 16 is an error, not a read past
  a row."""
  with pytest.raises(Exception, match='multiple of 16'):
    jax.block_until_ready(gather_sum.forward(jnp.zeros((N, 24)), jnp.ones((X, A)), jnp.zeros((X, A), jnp.int32)))
