"""Top-k router, its auxiliary losses, and the routed expert FFN.

Shape letters: slmjax/shapes.py (here X tokens, G groups, S tokens per group, A assignments per token, E experts,
D d_model, F expert width; in group-limited routing N expert groups of M experts each).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.dispatch import ExpertWeights, get_dispatch
from slmjax.kernels import router as router_call
from slmjax.layers import DenseFFN, dtype_of, is_gated, make_param


class Routing(NamedTuple):
  gates_XA: jax.Array  # float32 weight of each chosen expert
  experts_XA: jax.Array  # int32 index of each chosen expert
  probs_XE: jax.Array  # float32 softmax over all experts (for the load-balancing loss and entropy)
  logits_XE: jax.Array  # float32 raw router logits (for the z-loss)


def route(logits_XE: jax.Array, top_k: int, variant: str, renormalize: bool,
          bias_E: jax.Array | None = None, groups: int = 1, topk_groups: int = 1,
          sparsemixer_eps: float = 0.01) -> Routing:
  """Pick top_k experts per token.

  softmax_topk: softmax over all experts, keep the k largest probabilities (renormalised to sum to 1 if asked);
  topk_softmax: keep the k largest logits, softmax over those k (Mixtral);
  sigmoid: independent sigmoid scores, keep the k largest (renormalised if asked);
  sparsemixer: Phi-3.5-MoE's top-2 (`sparsemixer`). For the balance loss and entropy, `probs_XE` are the scores
  normalised to sum 1.
  A selection bias `bias_E` (DeepSeek-V3's auxiliary-loss-free balancing) is added to the scores that choose the
  k (probabilities, logits or sigmoid scores) but not to the gates, and gets no gradient: it steers selection only.
  With `groups` > 1 the k are chosen within the `topk_groups` best of `groups` equal expert groups
  (`group_mask`; DeepSeek V2 / V3).
  """
  logits_XE = logits_XE.astype(jnp.float32)
  if variant == 'sparsemixer':
    gates_XA, experts_XA = sparsemixer(logits_XE, sparsemixer_eps)
    return Routing(gates_XA, experts_XA, jax.nn.softmax(logits_XE, axis=-1), logits_XE)
  if variant == 'sigmoid':
    scores_XE = jax.nn.sigmoid(logits_XE)
    gates_XA, experts_XA = select_top_k(scores_XE, top_k, bias_E, groups, topk_groups, 'top2_sum')
    if renormalize:  # DeepSeek-V3's + 1e-20 keeps an all-underflow row finite
      gates_XA = gates_XA / (jnp.sum(gates_XA, axis=-1, keepdims=True) + 1e-20)
    probs_XE = scores_XE / jnp.sum(scores_XE, axis=-1, keepdims=True)
    return Routing(gates_XA, experts_XA.astype(jnp.int32), probs_XE, logits_XE)
  probs_XE = jax.nn.softmax(logits_XE, axis=-1)
  if variant == 'softmax_topk':
    gates_XA, experts_XA = select_top_k(probs_XE, top_k, bias_E, groups, topk_groups, 'max')
    if renormalize:
      gates_XA = gates_XA / jnp.sum(gates_XA, axis=-1, keepdims=True)
  elif variant == 'topk_softmax':
    top_logits_XA, experts_XA = select_top_k(logits_XE, top_k, bias_E, groups, topk_groups, 'max')
    gates_XA = jax.nn.softmax(top_logits_XA, axis=-1)
  else:
    raise ValueError(f'unknown router variant {variant!r}')
  return Routing(gates_XA, experts_XA.astype(jnp.int32), probs_XE, logits_XE)


def select_top_k(scores_XE: jax.Array, top_k: int, bias_E: jax.Array | None, groups: int = 1,
                 topk_groups: int = 1, group_score: str = 'max') -> tuple[jax.Array, jax.Array]:
  """(scores_XA, experts_XA): the k experts with the largest `scores_XE + bias_E` (within the kept groups) and
  their unbiased scores; the bias gets no gradient."""
  choice_XE = scores_XE
  if bias_E is not None:
    choice_XE = scores_XE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  if groups > 1:
    choice_XE = jnp.where(group_mask(jax.lax.stop_gradient(choice_XE), groups, topk_groups, group_score),
                          choice_XE, -jnp.inf)
  elif bias_E is None:
    return jax.lax.top_k(scores_XE, top_k)
  _, experts_XA = jax.lax.top_k(choice_XE, top_k)
  return jnp.take_along_axis(scores_XE, experts_XA, axis=-1), experts_XA


def group_mask(choice_XE: jax.Array, groups: int, topk_groups: int, group_score: str) -> jax.Array:
  """bool_XE: the experts of each token's `topk_groups` best groups (of `groups` equal, contiguous ones).

  A group scores its best expert (`max`: DeepSeek-V2 group_limited_greedy) or the sum of its two best
  (`top2_sum`: DeepSeek-V3 noaux_tc, on the biased scores).
  """
  X, E = choice_XE.shape
  choice_XNM = choice_XE.reshape(X, groups, E // groups)  # N groups of M experts
  if group_score == 'top2_sum':
    score_XN = jnp.sum(jax.lax.top_k(choice_XNM, 2)[0], axis=-1)
  else:
    score_XN = jnp.max(choice_XNM, axis=-1)
  _, kept_XK = jax.lax.top_k(score_XN, topk_groups)
  kept_XN = jnp.any(jax.nn.one_hot(kept_XK, groups, dtype=jnp.bool_), axis=1)
  return jnp.repeat(kept_XN, E // groups, axis=1)


def sparsemixer(logits_XE: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(gates_X2, experts_X2) of Phi-3.5-MoE's sparsemixer at inference (arXiv:2409.12136; transformers'
  `sparsemixer` with training=False): expert 1 is the arg max; its gate is its softmax weight among the experts
  whose logit is within a relative 2 * eps of the maximum, |max - l| / max(|l|, max) <= 2 eps. Expert 2 is the
  arg max of the rest, gated the same way against its own logit. Training uses this forward too, without the
  reference's Gumbel sampling and Heun-method gradient estimator (gradients flow through the masked softmax).
  """
  neg_inf = jnp.asarray(-jnp.inf, logits_XE.dtype)

  def pick(masked_XE):
    best_X1 = jnp.max(masked_XE, axis=-1, keepdims=True)
    expert_X1 = jnp.argmax(masked_XE, axis=-1, keepdims=True)
    factor_XE = jnp.maximum(jnp.abs(logits_XE), best_X1)
    outside_XE = jax.lax.stop_gradient((best_X1 - logits_XE) / factor_XE > 2 * eps)
    gate_X1 = jnp.take_along_axis(jax.nn.softmax(jnp.where(outside_XE, neg_inf, masked_XE), axis=-1), expert_X1,
                                  axis=-1)
    return gate_X1, expert_X1

  gate1_X1, expert1_X1 = pick(logits_XE)
  rest_XE = jnp.where(jnp.arange(logits_XE.shape[-1]) == expert1_X1, neg_inf, logits_XE)
  gate2_X1, expert2_X1 = pick(rest_XE)
  return (jnp.concatenate([gate1_X1, gate2_X1], axis=-1),
          jnp.concatenate([expert1_X1, expert2_X1], axis=-1).astype(jnp.int32))


def balance_selection_bias(bias_E: jax.Array, expert_load_E: jax.Array, rate: float) -> jax.Array:
  """One step of auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437, section 2.1.2).

  Experts with less than the mean load 1/E get their selection bias raised by `rate`, busier ones lowered.
  """
  return bias_E + rate * jnp.sign(1.0 / bias_E.shape[-1] - expert_load_E)


class SelectionBias(nnx.Variable):
  """The router's selection-only bias: a stored weight, not an nnx.Param, so gradients and the optimizer never
  touch it; with balance=bias|both the train step moves it by `balance_selection_bias` from the expert loads."""


def load_balancing_loss(probs_XE: jax.Array, experts_XA: jax.Array) -> jax.Array:
  """Switch Transformer loss E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4), generalised to top-k.

  f_e is the fraction of all X*k token-expert assignments (before capacity drops) that go to expert e, so
  sum_e f_e = 1; P_e is the mean router probability of expert e. A perfectly uniform router scores 1.0.
  """
  E = probs_XE.shape[-1]
  f_E = expert_load(experts_XA, E)
  return E * jnp.sum(f_E * jnp.mean(probs_XE, axis=0))


def z_loss(logits_XE: jax.Array) -> jax.Array:
  """Router z-loss of ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jax.nn.logsumexp(logits_XE, axis=-1) ** 2)


def expert_load(experts_XA: jax.Array, n_experts: int) -> jax.Array:
  """Fraction of token-expert assignments routed to each expert (sums to 1)."""
  counts_E = jnp.sum(jax.nn.one_hot(experts_XA, n_experts, dtype=jnp.float32), axis=(0, 1))
  return counts_E / experts_XA.size


def router_entropy(probs_XE: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the router's distribution over experts; log(E) is uniform, 0 is one-hot."""
  return jnp.mean(-jnp.sum(probs_XE * jnp.log(jnp.clip(probs_XE, 1e-30)), axis=-1))


def router_logits(x_XD: jax.Array, w_DE: jax.Array) -> jax.Array:
  """The router's logits x w in f32: one call each way on one CPU device (slmjax/kernels/router.py: no f32 copy
  of a bf16 x, the weight gradient on every thread), XLA's f32 einsum elsewhere."""
  if router_call.fits(x_XD, w_DE):
    return router_call.logits(x_XD, w_DE)
  return jnp.einsum('XD,DE->XE', x_XD.astype(jnp.float32), w_DE)


def group_size_for(n_tokens: int, group_size: int) -> int:
  """Largest S <= group_size that divides n_tokens (so tokens split into whole groups without padding)."""
  size = min(group_size, n_tokens)
  return size if n_tokens % size == 0 else math.gcd(n_tokens, size)


class MoEFFN(nnx.Module):
  """Routed expert FFN: a router picks top_k of n_experts per token; optional always-on shared experts.

  Options: a selection-only router bias (`router_bias`), a constant scale on the routed output
  (`routed_scale`), a per-token sigmoid gate on the shared experts (`shared_gate`).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, E, F, p = cfg.d_model, cfg.n_experts, cfg.expert_size, cfg.param_dtype
    self.cfg = cfg
    self.w_router_DE = make_param(rngs, (D, E), ('embed', 'expert'), 'float32', role='router')
    if is_gated(cfg.activation):
      self.w_gate_EDF = make_param(rngs, (E, D, F), ('expert', 'embed', 'mlp'), p, role='routed_expert', fan_in=D)
    self.w_up_EDF = make_param(rngs, (E, D, F), ('expert', 'embed', 'mlp'), p, role='routed_expert', fan_in=D)
    self.w_down_EFD = make_param(rngs, (E, F, D), ('expert', 'mlp', 'embed'), p, role='routed_expert', fan_in=F)
    if cfg.router_bias:
      self.b_select_E = SelectionBias(jnp.zeros((E,), jnp.float32), out_sharding=('expert',),
                                      eager_sharding=False, role='selection_bias')
    # n shared experts of width Fs are exactly one dense FFN of width n * Fs (hidden units are independent).
    self.shared = (DenseFFN(cfg, cfg.n_shared_experts * cfg.shared_size, rngs, 'shared_expert')
                   if cfg.n_shared_experts else None)
    if cfg.shared_gate:  # Qwen MoE: the shared output is scaled by sigmoid(x . w), one scalar per token
      self.w_shared_gate_D = make_param(rngs, (D,), ('embed',), p, role='shared_expert', fan_in=D)

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, T, D = x_BTD.shape
    x_XD = x_BTD.reshape(B * T, D)
    logits_XE = router_logits(x_XD, self.w_router_DE[...])
    routing = route(logits_XE, cfg.top_k, cfg.router, cfg.router_renormalize,
                    self.b_select_E[...] if cfg.router_bias else None, cfg.router_groups, cfg.router_topk_groups,
                    cfg.sparsemixer_eps)
    S = group_size_for(B * T, cfg.group_size)
    G = B * T // S
    weights = ExpertWeights(  # the master weights: each dispatch's products cast them (ExpertWeights.cast)
        self.w_gate_EDF[...] if is_gated(cfg.activation) else None, self.w_up_EDF[...], self.w_down_EFD[...])
    y_GSD, kept_GSA = get_dispatch(cfg.dispatch, cfg.dropless)(
        x_XD.reshape(G, S, D), (cfg.routed_scale * routing.gates_XA).reshape(G, S, -1),
        routing.experts_XA.reshape(G, S, -1),
        weights, cfg.capacity(S), cfg.activation, cfg.matmul)
    y_BTD = y_GSD.reshape(B, T, D).astype(x_BTD.dtype)
    if self.shared is not None:
      shared_BTD = self.shared(x_BTD)
      if cfg.shared_gate:
        gate_BT = jax.nn.sigmoid(jnp.einsum('BTD,D->BT', x_BTD, self.w_shared_gate_D[...].astype(dt)))
        shared_BTD = shared_BTD * gate_BT[..., None]
      y_BTD = y_BTD + shared_BTD
    extras = {
        'lb_loss': load_balancing_loss(routing.probs_XE, routing.experts_XA),
        'z_loss': z_loss(routing.logits_XE),
        'expert_load': expert_load(routing.experts_XA, cfg.n_experts),
        'drop_fraction': 1.0 - jnp.mean(kept_GSA.astype(jnp.float32)),
        'router_entropy': router_entropy(routing.probs_XE),
    }
    return y_BTD, extras
