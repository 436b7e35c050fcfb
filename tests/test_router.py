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


def test_group_limited_routing_keeps_the_best_groups_only():
  # 8 experts in 4 groups of 2; DeepSeek V2 ranks groups by their best score, V3 by the sum of their two best.
  scores_XE = jnp.array([[0.50, 0.45, 0.10, 0.05, 0.0, 0.95, 0.60, 0.01]])
  # group max: [0.50, 0.10, 0.95, 0.60] -> keep groups 2 and 3 -> top-2 of {0.0, 0.95, 0.60, 0.01} = 5, 6
  _, experts_XA = moe.select_top_k(scores_XE, 2, None, groups=4, topk_groups=2, group_score='max')
  assert sorted(experts_XA[0].tolist()) == [5, 6]
  # top-2 sums: [0.95, 0.15, 0.95, 0.61] -> groups 0 and 2 -> top-2 of {0.50, 0.45, 0.0, 0.95} = 5, 0
  gates_XA, experts_XA = moe.select_top_k(scores_XE, 2, None, groups=4, topk_groups=2, group_score='top2_sum')
  assert sorted(experts_XA[0].tolist()) == [0, 5]
  np.testing.assert_allclose(sorted(gates_XA[0].tolist()), [0.50, 0.95])
  # one group of everything is plain top-k
  plain = moe.select_top_k(scores_XE, 2, None)
  ones = moe.select_top_k(scores_XE, 2, None, groups=1, topk_groups=1)
  np.testing.assert_array_equal(plain[1], ones[1])


def test_deepseek_v3_routing_by_hand():
  """sigmoid scores; biased scores pick groups (top-2 sums) and experts; gates from unbiased scores,
  renormalised (the + 1e-20 of transformers' noaux_tc)."""
  logits_XE = jnp.array([[1.0, -1.0, 0.5, 0.0, 2.0, -2.0, 0.2, 0.1]])
  bias_E = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9])  # lifts group 3 over group 1
  s = 1 / (1 + np.exp(-np.array([1.0, -1.0, 0.5, 0.0, 2.0, -2.0, 0.2, 0.1])))
  # unbiased group sums 1.00, 1.12, 1.00, 1.08 -> groups 1 and 3: the best expert (4, in group 2) is out
  r = moe.route(logits_XE, 2, 'sigmoid', True, None, groups=4, topk_groups=2)
  assert sorted(r.experts_XA[0].tolist()) == [2, 6]
  # biased: group 3 sums 2.88 -> groups 3 and 1; within {2, 3, 6, 7} biased 0.62, 0.50, 1.45, 1.42 -> 6 and 7
  r = moe.route(logits_XE, 2, 'sigmoid', True, bias_E, groups=4, topk_groups=2)
  assert sorted(r.experts_XA[0].tolist()) == [6, 7]
  np.testing.assert_allclose(r.gates_XA[0], [s[6] / (s[6] + s[7]), s[7] / (s[6] + s[7])], rtol=1e-6)


def test_sparsemixer_matches_the_reference_eval_path():
  """Phi-3.5-MoE top-2 (transformers' sparsemixer, training=False), written out in numpy."""
  rng = np.random.default_rng(0)
  logits_XE = rng.normal(size=(64, 6)).astype(np.float32)
  logits_XE[0] = [3.0, 2.99, -1.0, 0.0, 1.0, 2.0]  # a near tie: both within 2 eps of the max share the softmax
  eps = 0.01

  def gate(scores, masked):
    best = masked.max(-1, keepdims=True)
    choice = masked.argmax(-1)
    outside = (best - scores) / np.maximum(np.abs(scores), best) > 2 * eps
    m = np.where(outside, -np.inf, masked)
    p = np.exp(m - m.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return p[np.arange(len(choice)), choice], choice
  g1, e1 = gate(logits_XE, logits_XE)
  rest = logits_XE.copy(); rest[np.arange(64), e1] = -np.inf
  g2, e2 = gate(logits_XE, rest)
  r = moe.route(jnp.asarray(logits_XE), 2, 'sparsemixer', renormalize=False, sparsemixer_eps=eps)
  np.testing.assert_array_equal(r.experts_XA, np.stack([e1, e2], -1))
  np.testing.assert_allclose(r.gates_XA, np.stack([g1, g2], -1), rtol=1e-6)
  assert 0.4 < float(r.gates_XA[0, 0]) < 0.6  # the near tie splits the first gate
  assert np.all(np.isfinite(jax.grad(lambda l: moe.route(l, 2, 'sparsemixer', False).gates_XA.sum())(
      jnp.asarray(logits_XE))))


@pytest.mark.parametrize('fields, message', [
    (dict(router_groups=3), 'must divide n_experts=8'),
    (dict(router_groups=4, router_topk_groups=5), 'at most router_groups=4'),
    (dict(router_groups=8, router_topk_groups=1, top_k=2), 'raise router_topk_groups'),
    (dict(router_groups=8, router_topk_groups=2, top_k=2, router='sigmoid'), 'at least 2'),
    (dict(router='sparsemixer', top_k=3), 'top_k=2'),
])
def test_bad_routing_settings_fail_in_one_line(fields, message):
  from slmjax.config import ModelConfig
  with pytest.raises(ValueError, match=message):
    ModelConfig(n_experts=8, **fields)
