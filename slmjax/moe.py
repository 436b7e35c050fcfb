"""Top-k router, its auxiliary losses, and the routed expert FFN.

Shape letters: slmjax/shapes.py (here X tokens, G groups, S tokens per group, A assignments per token, E experts,
D d_model, F expert width).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.dispatch import ExpertWeights, get_dispatch
from slmjax.layers import DenseFFN, dtype_of, is_gated, make_param


class Routing(NamedTuple):
  gates_XA: jax.Array  # float32 weight of each chosen expert
  experts_XA: jax.Array  # int32 index of each chosen expert
  probs_XE: jax.Array  # float32 softmax over all experts (for the load-balancing loss and entropy)
  logits_XE: jax.Array  # float32 raw router logits (for the z-loss)


def route(logits_XE: jax.Array, top_k: int, variant: str, renormalize: bool,
          bias_E: jax.Array | None = None) -> Routing:
  """Pick top_k experts per token.

  softmax_topk: softmax over all experts, keep the k largest probabilities (renormalised to sum to 1 if asked);
  topk_softmax: keep the k largest logits, softmax over those k (Mixtral);
  sigmoid: independent sigmoid scores, keep the k largest (renormalised if asked). For the balance loss and
  entropy, `probs_XE` are the scores normalised to sum 1.
  A selection bias `bias_E` (DeepSeek-V3's auxiliary-loss-free balancing) is added to the scores that choose the
  k (probabilities, logits or sigmoid scores) but not to the gates, and gets no gradient: it steers selection only.
  """
  logits_XE = logits_XE.astype(jnp.float32)
  if variant == 'sigmoid':
    scores_XE = jax.nn.sigmoid(logits_XE)
    gates_XA, experts_XA = select_top_k(scores_XE, top_k, bias_E)
    if renormalize:
      gates_XA = gates_XA / jnp.sum(gates_XA, axis=-1, keepdims=True)
    probs_XE = scores_XE / jnp.sum(scores_XE, axis=-1, keepdims=True)
    return Routing(gates_XA, experts_XA.astype(jnp.int32), probs_XE, logits_XE)
  probs_XE = jax.nn.softmax(logits_XE, axis=-1)
  if variant == 'softmax_topk':
    gates_XA, experts_XA = select_top_k(probs_XE, top_k, bias_E)
    if renormalize:
      gates_XA = gates_XA / jnp.sum(gates_XA, axis=-1, keepdims=True)
  elif variant == 'topk_softmax':
    top_logits_XA, experts_XA = select_top_k(logits_XE, top_k, bias_E)
    gates_XA = jax.nn.softmax(top_logits_XA, axis=-1)
  else:
    raise ValueError(f'unknown router variant {variant!r}')
  return Routing(gates_XA, experts_XA.astype(jnp.int32), probs_XE, logits_XE)


def select_top_k(scores_XE: jax.Array, top_k: int, bias_E: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(scores_XA, experts_XA): the k experts with the largest `scores_XE + bias_E` and their unbiased scores;
  the bias gets no gradient."""
  if bias_E is None:
    return jax.lax.top_k(scores_XE, top_k)
  _, experts_XA = jax.lax.top_k(scores_XE + jax.lax.stop_gradient(bias_E.astype(jnp.float32)), top_k)
  return jnp.take_along_axis(scores_XE, experts_XA, axis=-1), experts_XA


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
    logits_XE = jnp.einsum('XD,DE->XE', x_XD.astype(jnp.float32), self.w_router_DE[...])
    routing = route(logits_XE, cfg.top_k, cfg.router, cfg.router_renormalize,
                    self.b_select_E[...] if cfg.router_bias else None)
    S = group_size_for(B * T, cfg.group_size)
    G = B * T // S
    weights = ExpertWeights(
        self.w_gate_EDF[...].astype(dt) if is_gated(cfg.activation) else None,
        self.w_up_EDF[...].astype(dt), self.w_down_EFD[...].astype(dt))
    y_GSD, kept_GSA = get_dispatch(cfg.dispatch, cfg.dropless)(
        x_XD.reshape(G, S, D), (cfg.routed_scale * routing.gates_XA).reshape(G, S, -1),
        routing.experts_XA.reshape(G, S, -1),
        weights, cfg.capacity(S), cfg.activation)
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
