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


def test_group_limited_routing_picks_within_the_best_groups():
  # 8 experts in 4 groups of 2. The two largest scores (experts 0 and 2) sit in groups 0 and 1, but by the sum of
  # its top 2 (DeepSeek-V3) group 3 (experts 6, 7) wins and group 2 comes second; by its max (V2) groups 0, 1 win.
  logits_XE = jnp.array([[3.0, -3.0, 2.9, -3.0, 1.0, 1.0, 2.0, 2.0]])
  scores_E = np.asarray(jax.nn.sigmoid(logits_XE))[0]
  r = moe.route(logits_XE, 2, 'sigmoid', renormalize=True, groups=(4, 2, 'top2_sum'))
  assert sorted(r.experts_XA[0].tolist()) == [6, 7]
  np.testing.assert_allclose(r.gates_XA[0], [0.5, 0.5], rtol=1e-6)
  r = moe.route(logits_XE, 3, 'sigmoid', renormalize=False, groups=(4, 2, 'top2_sum'))
  assert sorted(r.experts_XA[0].tolist()) == [4, 6, 7] or sorted(r.experts_XA[0].tolist()) == [5, 6, 7]
  np.testing.assert_allclose(np.sort(r.gates_XA[0]), np.sort(scores_E[[4, 6, 7]]), rtol=1e-6)
  r = moe.route(logits_XE, 2, 'softmax_topk', renormalize=False, groups=(4, 1, 'max'))
  assert sorted(r.experts_XA[0].tolist()) == [0, 1]  # only group 0 kept: its weak expert 1 beats expert 2
  p_E = np.asarray(jax.nn.softmax(logits_XE))[0]
  np.testing.assert_allclose(r.gates_XA[0], p_E[[0, 1]], rtol=1e-6)
  # One group is plain top-k.
  for a, b in zip(moe.route(logits_XE, 2, 'sigmoid', True), moe.route(logits_XE, 2, 'sigmoid', True,
                                                                     groups=(1, 1, 'top2_sum'))):
    np.testing.assert_array_equal(a, b)


def test_group_scores_include_the_selection_bias():
  logits_XE = jnp.array([[3.0, 3.0, 0.0, 0.0]])
  bias_E = jnp.array([0.0, 0.0, 5.0, 5.0])  # moves group 1 ahead; gates stay the unbiased sigmoid scores
  r = moe.route(logits_XE, 2, 'sigmoid', renormalize=False, bias_E=bias_E, groups=(2, 1, 'top2_sum'))
  assert sorted(r.experts_XA[0].tolist()) == [2, 3]
  np.testing.assert_allclose(r.gates_XA[0], [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize('fields, message', [
    ({'router_groups': 3}, 'must divide n_experts'),
    ({'router_groups': 4, 'router_topk_groups': 5}, 'at most router_groups'),
    ({'router_groups': 4, 'router_topk_groups': 1, 'top_k': 3}, 'raise router_topk_groups'),
    ({'router_groups': 8, 'router_topk_groups': 2, 'router_group_score': 'top2_sum'}, 'at least 2 experts'),
])
def test_router_group_fields_are_validated(fields, message):
  from slmjax.config import ModelConfig
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{'n_experts': 8, 'top_k': 2, **fields})


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
    (dict(router='sparsemixer', top_k=3), 'top_k=2'),
    (dict(router='sparsemixer', router_groups=2), 'without router_groups'),
    (dict(router='sparsemixer', sparsemixer_eps=-1.0), 'sparsemixer_eps must be >= 0'),
])
def test_bad_sparsemixer_settings_fail_in_one_line(fields, message):
  from slmjax.config import ModelConfig
  with pytest.raises(ValueError, match=message):
    ModelConfig(n_experts=8, **{'top_k': 2, **fields})
