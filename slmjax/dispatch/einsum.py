"""The GShard reference dispatch: one-hot dispatch / combine tensors [G, S, E, C] contracted with einsums.

Shape letters: slmjax/shapes.py (here G, S, A, E, C, D and M = G * C, the rows of one expert's buffer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.axes import constrain
from slmjax.dispatch.experts import ExpertWeights, expert_ffn_rows
from slmjax.dispatch.grouped import equal_runs_ffn, row_tiles_pay
from slmjax.dispatch.slots import capacity_slots


def einsum_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                    matmul: str = 'xla'):
  """GShard-style dispatch (Lepikhin et al. 2020): a one-hot tensor [G,S,E,C] moves tokens into expert slots and,
  transposed, back. The gates scale the expert outputs in slot space, so dispatch and combine contract the same
  0/1 tensor and the gate gradient is a sum over D, not a fifth [G,S,E,C] x D contraction (4% faster on CPU).
  The experts' FFNs are batched products, or where `row_tiles_pay` `equal_runs_ffn`'s row tiles."""
  E, dt = w.w_up_EDF.shape[0], x_GSD.dtype
  G, S, D = x_GSD.shape
  slot_GSA, kept_GSA = capacity_slots(experts_GSA, E, capacity)
  expert_GSAE = jax.nn.one_hot(jnp.where(kept_GSA, experts_GSA, E), E, dtype=dt)  # dropped: all-zero row
  slot_GSAC = jax.nn.one_hot(slot_GSA, capacity, dtype=dt)
  dispatch_GSEC = jnp.einsum('GSAE,GSAC->GSEC', expert_GSAE, slot_GSAC)
  gate_EGC = jnp.einsum('GSEC,GSAE,GSA->EGC', dispatch_GSEC, expert_GSAE, gates_GSA.astype(dt))
  x_GSD = constrain(x_GSD, ('batch', None, 'embed'))
  x_EGCD = constrain(jnp.einsum('GSEC,GSD->EGCD', dispatch_GSEC, x_GSD), ('expert', 'group', None, 'embed'))
  M = G * capacity
  x_EMD = x_EGCD.reshape(E, M, D)
  if row_tiles_pay(M):
    y_EMD = equal_runs_ffn(x_EMD, w, activation, matmul)
  else:
    y_EMD = expert_ffn_rows(x_EMD, w, jnp.int32(M), activation, (M,))
  y_EGCD = y_EMD.reshape(E, G, capacity, D) * gate_EGC[..., None]
  return jnp.einsum('GSEC,EGCD->GSD', dispatch_GSEC, y_EGCD), kept_GSA
