"""Layer building blocks against plain reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import layers


def reference_attention(q_BTKGH, k_BSKH, v_BSKU, cap=0.0):
  T, H = q_BTKGH.shape[1], q_BTKGH.shape[-1]
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH) * H ** -0.5
  if cap:
    logits = cap * jnp.tanh(logits / cap)
  logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
  return jnp.einsum('BKGTS,BSKU->BTKGU', jax.nn.softmax(logits, -1), v_BSKU)


@pytest.mark.parametrize('T,G,U,cap', [(64, 1, 8, 0.0), (128, 2, 8, 0.0), (64, 2, 12, 5.0), (40, 1, 8, 0.0),
                                       (30, 3, 8, 0.0)])
def test_blocked_causal_attention_matches_reference(T, G, U, cap):
  """Query blocks (T = 64, 128: 4 blocks) and the unblocked path (T = 40, 30) give plain causal attention, with
  grouped heads, a value width U != H and soft-capping; gradients too."""
  rng = np.random.default_rng(0)
  B, K, H = 2, 2, 8
  q = jnp.asarray(rng.normal(size=(B, T, K, G, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, T, K, U)), jnp.float32)
  np.testing.assert_allclose(layers.causal_attention(q, k, v, cap), reference_attention(q, k, v, cap),
                             rtol=1e-5, atol=1e-5)
  w = jnp.asarray(rng.normal(size=(B, T, K, G, U)), jnp.float32)
  grads = jax.grad(lambda *a: jnp.vdot(layers.causal_attention(*a, cap), w), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda *a: jnp.vdot(reference_attention(*a, cap), w), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_linear_is_the_einsum():
  rng = np.random.default_rng(1)
  x_BTNH = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w_NHD = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
  w_DKH = jnp.asarray(rng.normal(size=(5, 2, 3)), jnp.float32)
  np.testing.assert_allclose(layers.linear(x_BTNH, w_NHD, n_in=2), jnp.einsum('BTNH,NHD->BTD', x_BTNH, w_NHD),
                             rtol=1e-5)
  np.testing.assert_allclose(layers.linear(x_BTNH, w_DKH), jnp.einsum('BTNH,HKU->BTNKU', x_BTNH, w_DKH), rtol=1e-5)
  with pytest.raises(ValueError, match='do not match'):
    layers.linear(x_BTNH, w_NHD)


def test_rope_is_the_half_split_rotation_and_relative():
  rng = np.random.default_rng(2)
  T, H = 12, 8
  cos_TH, sin_TH = layers.rope_tables(T, H, 10_000.0)
  x_BTNH = jnp.asarray(rng.normal(size=(2, T, 3, H)), jnp.float32)
  x1, x2 = x_BTNH[..., :H // 2], x_BTNH[..., H // 2:]
  c, s = cos_TH[None, :, None], sin_TH[None, :, None]
  want = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # Llama's rotate_half form
  np.testing.assert_allclose(layers.apply_rope(x_BTNH, cos_TH, sin_TH), want, rtol=1e-6, atol=1e-6)
  # A query at t and a key at t - d score the same for every t: only the offset matters.
  q_H, k_H = (jnp.asarray(rng.normal(size=H), jnp.float32) for _ in range(2))
  rot = lambda v: layers.apply_rope(jnp.broadcast_to(v, (1, T, 1, H)), cos_TH, sin_TH)[0, :, 0]
  q_TH, k_TH = rot(q_H), rot(k_H)
  scores = [float(q_TH[t] @ k_TH[t - 3]) for t in range(3, T)]
  np.testing.assert_allclose(scores, scores[0], rtol=1e-4)
