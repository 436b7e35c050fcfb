"""The decode dispatch: each assignment gathers its own expert's weights, so a step reads only the chosen experts.

A decode step of B sequences routes X = B tokens to X * A experts. While that is fewer than the E experts, the
weight matrices of each assignment are gathered ([X, A, D, F]) and applied to its token: the step reads the
weights of at most X * A experts instead of all E, which is why an MoE decodes at small batch at the speed of its
active parameters. With as many assignments as experts or more every expert is touched anyway (and gathered copies
would outweigh the experts themselves), so it runs `gather` with a capacity of every token (dropless) instead:
its buffers hold each expert's few rows, where `ragged` on CPU runs a 128-row tile per expert (the MoE decode's
dip at batch 4-16). Measured per layer on CPU (experiments/bench_decode_dispatch.py; README, "Decode"): from
X * A = E up to 512 assignments gather is 1.1-5x faster than ragged (E=8, k=2 and E=64, k=8), and below E select
is at least as fast as gather (2-5x faster at E=64). Never drops.

Shape letters: slmjax/shapes.py (here G, S, A, E, D, F and X = G * S, the tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.gather import gather_dispatch
from slmjax.layers import activate


def select_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Per-assignment weight gathers while X * A < E, else `gather_dispatch` with a slot for every token of a group
  (dropless, whatever `capacity` says); the choice is static: shapes."""
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  if X * A >= E:
    return gather_dispatch(x_GSD, gates_GSA, experts_GSA, w, S, activation)
  x_XD, experts_XA = x_GSD.reshape(X, D), experts_GSA.reshape(X, A)
  up_XAF = jnp.einsum('XD,XADF->XAF', x_XD, jnp.take(w.w_up_EDF, experts_XA, axis=0, mode='clip'))
  gate_XAF = (None if w.w_gate_EDF is None else
              jnp.einsum('XD,XADF->XAF', x_XD, jnp.take(w.w_gate_EDF, experts_XA, axis=0, mode='clip')))
  h_XAF = activate(gate_XAF, up_XAF, activation) * gates_GSA.reshape(X, A, 1).astype(x_GSD.dtype)
  y_XD = jnp.einsum('XAF,XAFD->XD', h_XAF, jnp.take(w.w_down_EFD, experts_XA, axis=0, mode='clip'))
  return y_XD.reshape(G, S, D), jnp.ones(experts_GSA.shape, dtype=bool)
