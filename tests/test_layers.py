"""Layer building blocks against plain reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import layers


def reference_attention(q_BTKQZ, k_BUKZ, v_BUKY, cap=0.0, window=0):
  T, Z = q_BTKQZ.shape[1], q_BTKQZ.shape[-1]
  logits = jnp.einsum('BTKQZ,BUKZ->BKQTU', q_BTKQZ, k_BUKZ) * Z ** -0.5
  if cap:
    logits = cap * jnp.tanh(logits / cap)
  causal = jnp.tril(jnp.ones((T, T), bool))
  if window:
    causal &= ~jnp.tril(jnp.ones((T, T), bool), -window)
  logits = jnp.where(causal, logits, -jnp.inf)
  return jnp.einsum('BKQTU,BUKY->BTKQY', jax.nn.softmax(logits, -1), v_BUKY)


def attention_outputs_and_grads(q, k, v, w, cap, window):
  """(ours, reference) outputs and (ours, reference) gradients of <out, w> in q, k, v, in one compile."""
  ours = lambda q, k, v: layers.causal_attention(q, k, v, cap, window=window)
  ref = lambda q, k, v: reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                            cap, window)

  @jax.jit
  def run(q, k, v):
    grads = [jax.grad(lambda *a: jnp.vdot(f(*a).astype(jnp.float32), w), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, ref)]
    return (ours(q, k, v), ref(q, k, v)), grads
  return run(q, k, v)


def random_qkvw(T, Q, Y, dtype=jnp.float32, seed=0, Z=8):
  rng = np.random.default_rng(seed)
  B, K = 2, 2
  shapes = (B, T, K, Q, Z), (B, T, K, Z), (B, T, K, Y)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in shapes)
  return q, k, v, jnp.asarray(rng.normal(size=(B, T, K, Q, Y)), jnp.float32)


@pytest.mark.parametrize('T,Q,Y,cap,window', [(64, 1, 8, 0.0, 0), (128, 2, 8, 0.0, 0), (64, 2, 12, 5.0, 0),
                                              (40, 1, 8, 0.0, 0), (30, 3, 8, 0.0, 0), (128, 1, 8, 2.0, 24)])
def test_blocked_causal_attention_matches_reference(T, Q, Y, cap, window):
  """Query blocks (T = 64, 128: 4 blocks) and the unblocked path (T = 40, 30) give plain causal attention, with
  grouped heads, a value width Y != Z, soft-capping and a sliding window; gradients too (attention_core's own
  backward against autodiff of the plain formula)."""
  q, k, v, w = random_qkvw(T, Q, Y)
  (out, ref_out), (grads, ref_grads) = attention_outputs_and_grads(q, k, v, w, cap, window)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_blocked_causal_attention_in_bf16_is_close_to_f32():
  """bf16 operands: outputs and gradients (bf16, f32-accumulated) within bf16's rounding of the f32 reference."""
  assert_bf16_close_to_f32(*random_qkvw(128, 2, 8, jnp.bfloat16))


def assert_bf16_close_to_f32(q, k, v, w):
  """causal_attention of bf16 q, k, v: bf16 outputs and gradients within bf16's rounding of the f32 formula's."""
  (out, ref_out), (grads, ref_grads) = attention_outputs_and_grads(q, k, v, w, 0.0, 0)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, rtol=0.03, atol=0.03)
  for got, want in zip(grads, ref_grads):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got.astype(jnp.float32) / scale, want / scale, atol=0.02)


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
