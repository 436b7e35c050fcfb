"""Router selection and auxiliary losses, checked against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import moe


def test_softmax_topk_renormalises_and_topk_softmax_matches_mixtral():
  logits_XE = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  p = np.exp([2.0, 1.0, 0.0, -1.0]); p /= p.sum()
  r = moe.route(logits_XE, 2, 'softmax_topk', renormalize=False)
  np.testing.assert_allclose(r.gates_XA, [[p[0], p[1]]], rtol=1e-6)
  assert r.experts_XA.tolist() == [[0, 1]]
  r = moe.route(logits_XE, 2, 'softmax_topk', renormalize=True)
  np.testing.assert_allclose(r.gates_XA, [[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]], rtol=1e-6)
  r = moe.route(logits_XE, 2, 'topk_softmax', renormalize=False)
  e = math.exp(1.0)
  np.testing.assert_allclose(r.gates_XA, [[e / (e + 1), 1 / (e + 1)]], rtol=1e-6)


def test_load_balancing_loss_by_hand():
  # 2 tokens, 2 experts, top-1. Token 0 -> expert 0 (p=0.75), token 1 -> expert 0 (p=0.6).
  probs_XE = jnp.array([[0.75, 0.25], [0.6, 0.4]])
  experts_XA = jnp.array([[0], [0]])
  # f = [1, 0], P = [0.675, 0.325]  ->  E * sum f P = 2 * 0.675
  assert float(moe.load_balancing_loss(probs_XE, experts_XA)) == pytest.approx(1.35)
  # Uniform router and perfectly balanced top-2 assignments score exactly 1.
  probs_XE = jnp.full((4, 4), 0.25)
  experts_XA = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])
  assert float(moe.load_balancing_loss(probs_XE, experts_XA)) == pytest.approx(1.0)
  np.testing.assert_allclose(moe.expert_load(experts_XA, 4), [0.25] * 4)


def test_z_loss_and_entropy_by_hand():
  logits_XE = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  # logsumexp: log 2 and log 4.
  expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
  assert float(moe.z_loss(logits_XE)) == pytest.approx(expected, rel=1e-6)
  probs_XE = jnp.array([[0.5, 0.5], [1.0, 0.0]])
  assert float(moe.router_entropy(probs_XE)) == pytest.approx(math.log(2.0) / 2, rel=1e-6)


@pytest.mark.parametrize('n_tokens, group_size, expected', [(64, 16, 16), (64, 128, 64), (48, 32, 16), (7, 4, 1)])
def test_group_size_divides_tokens(n_tokens, group_size, expected):
  assert moe.group_size_for(n_tokens, group_size) == expected


@pytest.mark.parametrize('variant', ['softmax_topk', 'topk_softmax', 'sigmoid'])
def test_selection_bias_steers_every_router_variant_but_not_its_gates(variant):
  logits_XE = jnp.array([[0.0, 1.0, 2.0, -1.0], [0.5, -0.5, 1.5, 0.0]])
  plain = moe.route(logits_XE, 2, variant, renormalize=True)
  zero = moe.route(logits_XE, 2, variant, renormalize=True, bias_E=jnp.zeros(4))
  for a, b in zip(plain, zero):  # a zero bias routes exactly as no bias
    np.testing.assert_array_equal(a, b)
  bias_E = jnp.array([0.0, 0.0, 0.0, 10.0])
  r = moe.route(logits_XE, 2, variant, renormalize=True, bias_E=bias_E)
  assert r.experts_XA.tolist() == [[3, 2], [3, 2]]  # expert 3 only by its bias, then each token's best
  chosen_XA = {'softmax_topk': jax.nn.softmax(logits_XE), 'topk_softmax': logits_XE,
               'sigmoid': jax.nn.sigmoid(logits_XE)}[variant][:, [3, 2]]  # the unbiased scores of the chosen two
  expected_XA = (jax.nn.softmax(chosen_XA) if variant == 'topk_softmax' else
                 chosen_XA / chosen_XA.sum(-1, keepdims=True))
  np.testing.assert_allclose(r.gates_XA, expected_XA, rtol=1e-6)
  np.testing.assert_array_equal(r.probs_XE, plain.probs_XE)
  grad_E = jax.grad(lambda b: jnp.sum(moe.route(logits_XE, 2, variant, True, b).gates_XA ** 2))(bias_E)
  np.testing.assert_array_equal(grad_E, 0.0)
