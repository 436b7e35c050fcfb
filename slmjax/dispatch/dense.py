"""The correctness oracle: every expert on every token, mixed by the gates (E / k times the FLOPs).

Shape letters: slmjax/shapes.py (here G, S, A, E, D and X = G * S, the tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.experts import ExpertWeights, expert_ffn


def dense_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                   matmul: str = 'xla'):
  """Correctness oracle: every expert runs on every token, outputs mixed by the gates; never drops."""
  del capacity, matmul  # never drops; batched products stay XLA's (slmjax/dispatch/__init__.py)
  E = w.w_up_EDF.shape[0]
  G, S, D = x_GSD.shape
  y_EXD = expert_ffn(jnp.broadcast_to(x_GSD.reshape(1, G * S, D), (E, G * S, D)), w, activation)
  weight_GSE = jnp.einsum('GSAE,GSA->GSE', jax.nn.one_hot(experts_GSA, E, dtype=x_GSD.dtype),
                          gates_GSA.astype(x_GSD.dtype))
  y_GSD = jnp.einsum('GSE,EGSD->GSD', weight_GSE, y_EXD.reshape(E, G, S, D))
  return y_GSD, jnp.ones(experts_GSA.shape, dtype=bool)
