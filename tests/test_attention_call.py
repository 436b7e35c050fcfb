"""The attention call (slmjax/kernels/attention.py and .cc): causal attention's values and gradients as the plain
formula's, taken by `causal_attention` exactly where the call fits, XLA's ops elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import layers
from slmjax.kernels import attention as call
from own_kernels import built_in_temp_cache
from test_layers import assert_bf16_close_to_f32, attention_outputs_and_grads, random_qkvw


@pytest.fixture(scope='module', autouse=True)
def built(tmp_path_factory):
  yield from built_in_temp_cache(tmp_path_factory, call.load, 'attention call')


def test_loads_again_after_its_cache_is_cleared():
  """A second load in one process registers nothing twice (XLA would refuse it)."""
  call.load.cache_clear()
  assert call.load() is None


def takes_call(q, k, v, cap=0.0, window=0, matmul='auto') -> bool:
  """Whether causal_attention's forward and backward (of <out, 1>) compile to the attention calls."""
  loss = lambda q, k, v: jnp.sum(layers.causal_attention(q, k, v, cap, window=window, matmul=matmul)
                                 .astype(jnp.float32))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  suffix = '_bf16' if q.dtype == jnp.bfloat16 else ''  # bf16 operands go to the bf16 handlers, uncast
  return f'@slmjax_attention_fwd{suffix}(' in hlo and f'@slmjax_attention_bwd{suffix}(' in hlo


@pytest.mark.parametrize('T,Q,Y,Z', [(96, 1, 32, 32), (64, 3, 64, 32), (256, 2, 32, 64)])
def test_matches_plain_attention_values_and_gradients(T, Q, Y, Z):
  """A backward group of 64 rows and one of 32 (T = 96), grouped query heads sharing a key head (their key and
  value gradients summed), a value width Y != Z, and 256 positions: the call's output and the gradients of q, k, v
  equal autodiff of the plain formula."""
  q, k, v, w = random_qkvw(T, Q, Y, Z=Z, seed=T + Q)
  assert takes_call(q, k, v)
  (out, ref_out), (grads, ref_grads) = attention_outputs_and_grads(q, k, v, w, 0.0, 0)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_operands_are_close_to_f32():
  """bf16 q, k, v (read into f32 inside the call, results rounded once): bf16 outputs and gradients within
  bf16's rounding of f32's."""
  q, k, v, w = random_qkvw(128, 2, 32, jnp.bfloat16, Z=32)
  assert takes_call(q, k, v)
  assert_bf16_close_to_f32(q, k, v, w)


@pytest.mark.parametrize('T,Z,cap,window', [(64, 32, 5.0, 0), (64, 32, 0.0, 24), (80, 32, 0.0, 0),
                                            (64, 8, 0.0, 0)])
def test_xla_ops_where_the_call_does_not_fit(T, Z, cap, window):
  """A soft-cap, a window, positions or head widths not multiples of 32: XLA's ops, still the plain formula."""
  q, k, v, w = random_qkvw(T, 1, 32, Z=Z)
  assert not takes_call(q, k, v, cap, window)
  (out, ref_out), _ = attention_outputs_and_grads(q, k, v, w, cap, window)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_and_matmuls_other_than_auto_do_not_fit():
  """Mixed dtypes, and `matmul` 'xla' (everything in XLA's ops) or a vendor GEMM, keep XLA's attention."""
  q, k, v, _ = random_qkvw(64, 1, 32, Z=32)
  assert call.fits(q, k, v, 0.0, 0)
  assert not call.fits(q, k.astype(jnp.bfloat16), v, 0.0, 0)
  assert not takes_call(q, k, v, matmul='xla') and not call.fits(q, k, v, 0.0, 0, 'onednn')


def test_vmap_runs_the_call_per_element():
  """jax.vmap over a leading axis (the calls loop over it) gives each element's own attention."""
  q, k, v, _ = random_qkvw(64, 1, 32, Z=32)
  stacked = [jnp.stack([a, a[::-1]]) for a in (q, k, v)]
  out = jax.vmap(lambda q, k, v: layers.causal_attention(q, k, v))(*stacked)
  for i, pick in enumerate((lambda a: a, lambda a: a[::-1])):
    np.testing.assert_allclose(out[i], layers.causal_attention(pick(q), pick(k), pick(v)), rtol=1e-6, atol=1e-6)
