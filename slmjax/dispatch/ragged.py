"""The dropless dispatch: assignments sorted by expert, then grouped matmuls; `capacity` is ignored.

Shape letters: slmjax/shapes.py (here G, S, A, E, D, F, X = G * S tokens, N rows sorted by expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.grouped import GROUP_TILE, grouped_ffn
from slmjax.dispatch.rows import combine_rows, dispatch_rows
from slmjax.layers import activate


def ragged_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Dropless: assignments sorted by expert, then grouped matmuls; `capacity` is ignored.

  The grouped matmuls: `sorted_rows_ffn`.
  """
  del capacity
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  experts_N = experts_GSA.reshape(X * A)
  _, asg_N = jax.lax.sort((experts_N, jnp.arange(X * A, dtype=jnp.int32)), num_keys=1)
  dest_XA = jnp.zeros(X * A, jnp.int32).at[asg_N].set(jnp.arange(X * A, dtype=jnp.int32),
                                                       unique_indices=True).reshape(X, A)
  sizes_E = jnp.zeros(E, jnp.int32).at[experts_N].add(1)
  if slack_rows():  # grouped_ffn's slack rows, read from token X (clipped): empty rows
    asg_N = jnp.concatenate([asg_N, jnp.full((slack_rows(),), X * A, jnp.int32)])
  x_ND, = dispatch_rows(x_GSD.reshape(X, D), (asg_N // A,), dest_XA)
  y_ND = sorted_rows_ffn(x_ND, w, sizes_E, activation)
  y_XD = combine_rows((y_ND,), gates_GSA.reshape(X, A).astype(x_GSD.dtype), dest_XA, (asg_N,))
  return y_XD.reshape(G, S, D), jnp.ones(experts_GSA.shape, dtype=bool)


def slack_rows() -> int:
  """Rows `sorted_rows_ffn` needs past the last sorted row: grouped_ffn's last tile on CPU, none elsewhere."""
  return GROUP_TILE if jax.default_backend() == 'cpu' else 0


def sorted_rows_ffn(x_ND, w: ExpertWeights, sizes_E, activation: str):
  """Expert e's FFN on its run of sizes_E[e] rows, for rows sorted by expert (plus `slack_rows()` rows): the
  grouped matmuls are `jax.lax.ragged_dot` on accelerators with grouped-matmul kernels, `grouped_ffn`'s row
  tiles on CPU (where ragged_dot lowers to a dense masked product, E times the work)."""
  if jax.default_backend() == 'cpu':
    return grouped_ffn(x_ND, w, sizes_E, activation)
  up_NF = jax.lax.ragged_dot(x_ND, w.w_up_EDF, sizes_E)
  gate_NF = None if w.w_gate_EDF is None else jax.lax.ragged_dot(x_ND, w.w_gate_EDF, sizes_E)
  return jax.lax.ragged_dot(activate(gate_NF, up_NF, activation), w.w_down_EFD, sizes_E)
