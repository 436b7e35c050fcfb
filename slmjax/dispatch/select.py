"""The decode dispatch: each assignment gathers its own expert's weights, so a step reads only the chosen experts.

A decode step of B sequences routes X = B tokens to X * A experts. While that is fewer than the E experts, the
weight matrices of each assignment are gathered ([X, A, D, F]) and applied to its token: the step reads the
weights of at most X * A experts instead of all E, which is why an MoE decodes at small batch at the speed of its
active parameters. With as many assignments as experts or more every expert is touched anyway (and gathered copies
would outweigh the experts themselves), so it runs the dropless `ragged` dispatch instead. Never drops.

Shape letters: slmjax/shapes.py (here G, S, A, E, D, F and X = G * S, the tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.ragged import ragged_dispatch
from slmjax.layers import activate


def select_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Per-assignment weight gathers while X * A < E, else `ragged_dispatch` (the choice is static: shapes)."""
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  if X * A >= E:
    return ragged_dispatch(x_GSD, gates_GSA, experts_GSA, w, capacity, activation)
  x_XD, experts_XA = x_GSD.reshape(X, D), experts_GSA.reshape(X, A)
  up_XAF = jnp.einsum('XD,XADF->XAF', x_XD, jnp.take(w.w_up_EDF, experts_XA, axis=0, mode='clip'))
  gate_XAF = (None if w.w_gate_EDF is None else
              jnp.einsum('XD,XADF->XAF', x_XD, jnp.take(w.w_gate_EDF, experts_XA, axis=0, mode='clip')))
  h_XAF = activate(gate_XAF, up_XAF, activation) * gates_GSA.reshape(X, A, 1).astype(x_GSD.dtype)
  y_XD = jnp.einsum('XAF,XAFD->XD', h_XAF, jnp.take(w.w_down_EFD, experts_XA, axis=0, mode='clip'))
  return y_XD.reshape(G, S, D), jnp.ones(experts_GSA.shape, dtype=bool)
