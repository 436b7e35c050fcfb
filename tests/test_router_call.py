"""The router's product as calls (slmjax/kernels/router.py and .cc, slmjax/moe.py's router_logits): the same
logits and gradients as XLA's f32 einsum, for f32 and bf16 tokens and expert counts that fill and that straddle
the forward's and backward's blocks of 8 experts, taken only where they run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import moe
from slmjax.kernels import router
from own_kernels import floor_call_fixtures


built, small_f32_taken = floor_call_fixtures(router, 'router call')


def _value_and_grads(logits_fn, x_XD, w_DE, dlogits_XE):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(logits_fn(x, w), dlogits_XE), argnums=(0, 1)))(x_XD, w_DE)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('D, E', [(64, 8), (48, 20)])
def test_matches_xlas_einsum(dtype, D, E):
  rng = np.random.default_rng(E)
  x_XD = jnp.asarray(rng.normal(size=(300, D)), dtype)
  w_DE = jnp.asarray(rng.normal(size=(D, E)) * 0.1, jnp.float32)
  dlogits_XE = jnp.asarray(rng.normal(size=(300, E)), jnp.float32)
  assert router.fits(x_XD, w_DE)
  np.testing.assert_allclose(jax.jit(router.logits)(x_XD, w_DE),
                             jnp.einsum('XD,DE->XE', x_XD.astype(jnp.float32), w_DE), rtol=1e-5, atol=1e-5)
  xla = lambda x, w: jnp.einsum('XD,DE->XE', x.astype(jnp.float32), w)
  (got, (got_dx, got_dw)), (want, (want_dx, want_dw)) = (_value_and_grads(fn, x_XD, w_DE, dlogits_XE)
                                                         for fn in (router.logits, xla))
  assert got_dx.dtype == dtype and got_dw.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  tol = 1e-5 if dtype == jnp.float32 else 8e-3  # dx rounded to bf16 once, after sums in another order
  np.testing.assert_allclose(np.asarray(got_dx, np.float32), np.asarray(want_dx, np.float32), rtol=tol, atol=tol)
  np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('X, E', [(0, 8), (16, 0)])
def test_no_tokens_or_no_experts_give_zeros(X, E):
  """Edge shapes `fits` lets through: no tokens (dw zero) and no experts (dx zero), not memory left unwritten."""
  x_XD, w_DE = jnp.ones((X, 32), jnp.bfloat16), jnp.ones((32, E), jnp.float32)
  logits_XE, vjp = jax.vjp(router.logits, x_XD, w_DE)
  dx_XD, dw_DE = vjp(jnp.ones_like(logits_XE))
  assert logits_XE.shape == (X, E) and not np.any(np.asarray(dx_XD, np.float32)) and not np.any(dw_DE)


def test_taken_only_where_the_calls_run(monkeypatch):
  w_DE = jnp.zeros((32, 8), jnp.float32)
  assert router.fits(jnp.zeros((4, 32), jnp.bfloat16), w_DE)
  assert not router.fits(jnp.zeros((4, 24)), jnp.zeros((24, 8)))  # width not a multiple of 16
  assert not router.fits(jnp.zeros((4, 32), jnp.float16), w_DE)
  assert not router.fits(jnp.zeros((4, 32)), w_DE.astype(jnp.bfloat16))
  monkeypatch.setattr(router, 'MIN_F32_ELEMENTS', 2 ** 17)  # the default: small f32 products stay in XLA
  assert not router.fits(jnp.zeros((2048, 32)), w_DE) and router.fits(jnp.zeros((4096, 32)), w_DE)
  assert router.fits(jnp.zeros((2048, 32), jnp.bfloat16), w_DE)
  x_XD = jnp.ones((4, 32), jnp.bfloat16)
  assert 'slmjax_router_fwd_bf16' in jax.jit(moe.router_logits).lower(x_XD, w_DE).as_text()
  monkeypatch.setattr(router, 'fits', lambda *a: False)
  assert 'slmjax_router' not in jax.jit(lambda x, w: moe.router_logits(x, w)).lower(x_XD, w_DE).as_text()
