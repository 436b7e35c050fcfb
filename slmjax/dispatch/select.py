"""The decode dispatch: each assignment reads its own expert's weights, so a step reads only the chosen experts.

A decode step of B sequences routes X = B tokens to X * A experts. While that is fewer than the E experts, a scan
over the X * A assignments slices each one's expert matrices out in place (dynamic slices, read by the dots) and
applies them to its token: the step reads the weights of at most X * A experts instead of all E, which is why an MoE
decodes at small batch at the speed of its active parameters. With as many assignments as experts or more every
expert is read anyway, so it runs `gather` with a capacity of every token (dropless) instead, one batched matmul per
weight rather than a scan step per assignment: its buffers hold each expert's few rows, where `ragged` on CPU runs a
128-row tile per expert (the MoE decode's dip at batch 4-16). Measured per layer on CPU
(experiments/bench_decode_dispatch.py; README, "Decode"): from X * A = E up to 512 assignments gather is 1.1-5x
faster than ragged (E=8, k=2 and E=64, k=8), and below E select is faster than gather (at X = 1: 204 vs 464 us at
E=8, k=2; 148 vs 1969 us at E=64, k=8). Never drops.

Shape letters: slmjax/shapes.py (here G, S, A, E, D, F and X = G * S, the tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.bits import index_in_dim
from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.gather import gather_dispatch
from slmjax.layers import activate


def select_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                    matmul: str = 'xla'):
  """Per-assignment expert FFNs on sliced weights while X * A < E, else `gather_dispatch` with a slot for every
  token of a group (dropless, whatever `capacity` says); the choice is static: shapes."""
  del matmul  # batched products stay XLA's (slmjax/dispatch/__init__.py)
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  if X * A >= E:
    return gather_dispatch(x_GSD, gates_GSA, experts_GSA, w, S, activation)
  x_ND = jnp.repeat(x_GSD.reshape(X, D), A, axis=0)  # one row per assignment, N = X * A

  def expert_ffn(carry, row):
    """One assignment: its expert's matrices sliced out in place (dynamic slices feed the dots; a gather
    would copy each [D, F] first, 2.7x slower at mixtral-512's layer)."""
    x_D, expert, gate = row
    pick = lambda weights: index_in_dim(weights, expert)  # on the bits: a bf16 slice would copy every expert to f32
    up_F = x_D @ pick(w.w_up_EDF)
    gate_F = None if w.w_gate_EDF is None else x_D @ pick(w.w_gate_EDF)
    return carry, (activate(gate_F, up_F, activation) * gate.astype(x_D.dtype)) @ pick(w.w_down_EFD)

  rows = (x_ND, experts_GSA.reshape(X * A), gates_GSA.reshape(X * A))
  _, y_ND = jax.lax.scan(expert_ffn, None, rows)
  return y_ND.reshape(G, S, A, D).sum(axis=2), jnp.ones(experts_GSA.shape, dtype=bool)
