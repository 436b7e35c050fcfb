"""Layer building blocks against plain reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import layers


def reference_attention(q_BTKQZ, k_BUKZ, v_BUKY, cap=0.0):
  T, Z = q_BTKQZ.shape[1], q_BTKQZ.shape[-1]
  logits = jnp.einsum('BTKQZ,BUKZ->BKQTU', q_BTKQZ, k_BUKZ) * Z ** -0.5
  if cap:
    logits = cap * jnp.tanh(logits / cap)
  logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
  return jnp.einsum('BKQTU,BUKY->BTKQY', jax.nn.softmax(logits, -1), v_BUKY)


@pytest.mark.parametrize('T,Q,Y,cap', [(64, 1, 8, 0.0), (128, 2, 8, 0.0), (64, 2, 12, 5.0), (40, 1, 8, 0.0),
                                       (30, 3, 8, 0.0)])
def test_blocked_causal_attention_matches_reference(T, Q, Y, cap):
  """Query blocks (T = 64, 128: 4 blocks) and the unblocked path (T = 40, 30) give plain causal attention, with
  grouped heads, a value width Y != Z and soft-capping; gradients too."""
  rng = np.random.default_rng(0)
  B, K, Z = 2, 2, 8
  q = jnp.asarray(rng.normal(size=(B, T, K, Q, Z)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, T, K, Z)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, T, K, Y)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(B, T, K, Q, Y)), jnp.float32)

  @jax.jit  # one compile each, not one per op
  def outputs_and_grads(q, k, v):
    outs = layers.causal_attention(q, k, v, cap), reference_attention(q, k, v, cap)
    grads = [jax.grad(lambda *a: jnp.vdot(f(*a, cap), w), argnums=(0, 1, 2))(q, k, v)
             for f in (layers.causal_attention, reference_attention)]
    return outs, grads

  (out, ref_out), (grads, ref_grads) = outputs_and_grads(q, k, v)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_linear_is_the_einsum():
  rng = np.random.default_rng(1)
  x_BTHZ = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w_HZD = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
  w_ZKY = jnp.asarray(rng.normal(size=(5, 2, 3)), jnp.float32)
  np.testing.assert_allclose(layers.linear(x_BTHZ, w_HZD, n_in=2), jnp.einsum('BTHZ,HZD->BTD', x_BTHZ, w_HZD),
                             rtol=1e-5)
  np.testing.assert_allclose(layers.linear(x_BTHZ, w_ZKY), jnp.einsum('BTHZ,ZKY->BTHKY', x_BTHZ, w_ZKY), rtol=1e-5)
  with pytest.raises(ValueError, match='do not match'):
    layers.linear(x_BTHZ, w_HZD)


def test_rope_is_the_half_split_rotation_and_relative():
  rng = np.random.default_rng(2)
  T, R = 12, 8
  cos_TR, sin_TR = layers.rope_tables(T, R, 10_000.0)
  x_BTHR = jnp.asarray(rng.normal(size=(2, T, 3, R)), jnp.float32)
  x1, x2 = x_BTHR[..., :R // 2], x_BTHR[..., R // 2:]
  c, s = cos_TR[None, :, None], sin_TR[None, :, None]
  want = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # Llama's rotate_half form
  np.testing.assert_allclose(layers.apply_rope(x_BTHR, cos_TR, sin_TR), want, rtol=1e-6, atol=1e-6)
  # A query at t and a key at t - d score the same for every t: only the offset matters.
  q_R, k_R = (jnp.asarray(rng.normal(size=R), jnp.float32) for _ in range(2))
  rot = lambda v: layers.apply_rope(jnp.broadcast_to(v, (1, T, 1, R)), cos_TR, sin_TR)[0, :, 0]
  q_TR, k_TR = rot(q_R), rot(k_R)
  scores = [float(q_TR[t] @ k_TR[t - 3]) for t in range(3, T)]
  np.testing.assert_allclose(scores, scores[0], rtol=1e-4)
