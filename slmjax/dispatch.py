"""Token-to-expert dispatch implementations behind one interface.

Every implementation has the signature
  dispatch(x_GSD, gates_GSA, experts_GSA, weights, capacity, activation) -> (y_GSD, kept_GSA)
where tokens come split into G groups of S tokens, each token has A = top_k (expert index, gate) pairs, `capacity`
is C, the slots per expert per group, and `kept_GSA` says which assignments were computed (not dropped for lack
of capacity). A token whose assignments are all dropped gets a zero output: the residual carries it through.

Capacity priority (shared by every dropping implementation): the first choices of all tokens in a group are placed
before any second choice, and within one choice rank earlier tokens come first (GShard / Switch convention).

Dimension letters: G groups, S tokens per group, A assignments per token (top_k), E experts, C capacity,
D d_model, F expert width, X any flattened token axis.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from slmjax.layers import activate


class ExpertWeights(NamedTuple):
  """Stacked weights of E experts; `w_gate_EDF` is None for the ungated GELU FFN."""
  w_gate_EDF: jax.Array | None
  w_up_EDF: jax.Array
  w_down_EFD: jax.Array


def expert_ffn(x_EXD: jax.Array, w: ExpertWeights, activation: str) -> jax.Array:
  """Run expert e's FFN on the tokens x_EXD[e], for all experts at once (batched matmuls)."""
  up_EXF = jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_up_EDF)
  gate_EXF = None if w.w_gate_EDF is None else jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_gate_EDF)
  return jnp.einsum('EXF,EFD->EXD', activate(gate_EXF, up_EXF, activation), w.w_down_EFD)


def capacity_slots(experts_GSA: jax.Array, n_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Slot of each assignment inside its expert's buffer, and whether it fits (slot < capacity).

  Choice-major priority: all first choices of a group, in token order, then all second choices, and so on.
  """
  G, S, A = experts_GSA.shape
  mask_GASE = jax.nn.one_hot(experts_GSA.transpose(0, 2, 1), n_experts, dtype=jnp.int32)
  mask_GXE = mask_GASE.reshape(G, A * S, n_experts)
  slot_GXE = jnp.cumsum(mask_GXE, axis=1) - 1  # running count of earlier assignments to the same expert
  slot_GX = jnp.sum(slot_GXE * mask_GXE, axis=-1)
  slot_GSA = slot_GX.reshape(G, A, S).transpose(0, 2, 1)
  return slot_GSA, slot_GSA < capacity


def einsum_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """GShard-style dispatch: one-hot dispatch/combine tensors [G,S,E,C] and einsums (Lepikhin et al. 2020)."""
  E, dt = w.w_up_EDF.shape[0], x_GSD.dtype
  G, S, D = x_GSD.shape
  slot_GSA, kept_GSA = capacity_slots(experts_GSA, E, capacity)
  expert_GSAE = jax.nn.one_hot(experts_GSA, E, dtype=dt) * kept_GSA[..., None].astype(dt)
  slot_GSAC = jax.nn.one_hot(slot_GSA, capacity, dtype=dt)  # all-zero rows for slot >= C (dropped)
  dispatch_GSEC = jnp.einsum('GSAE,GSAC->GSEC', expert_GSAE, slot_GSAC)
  combine_GSEC = jnp.einsum('GSAE,GSAC->GSEC', expert_GSAE * gates_GSA[..., None].astype(dt), slot_GSAC)
  x_EGCD = jnp.einsum('GSEC,GSD->EGCD', dispatch_GSEC, x_GSD)
  y_EXD = expert_ffn(x_EGCD.reshape(E, G * capacity, D), w, activation)
  y_EGCD = y_EXD.reshape(E, G, capacity, D)
  return jnp.einsum('GSEC,EGCD->GSD', combine_GSEC, y_EGCD), kept_GSA


def dense_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Correctness oracle: every expert runs on every token, outputs mixed by the gates; never drops."""
  del capacity
  E = w.w_up_EDF.shape[0]
  G, S, D = x_GSD.shape
  y_EXD = expert_ffn(jnp.broadcast_to(x_GSD.reshape(1, G * S, D), (E, G * S, D)), w, activation)
  weight_GSE = jnp.einsum('GSAE,GSA->GSE', jax.nn.one_hot(experts_GSA, E, dtype=x_GSD.dtype),
                          gates_GSA.astype(x_GSD.dtype))
  y_GSD = jnp.einsum('GSE,EGSD->GSD', weight_GSE, y_EXD.reshape(E, G, S, D))
  return y_GSD, jnp.ones(experts_GSA.shape, dtype=bool)


DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCH: dict[str, DispatchFn] = {'einsum': einsum_dispatch, 'dense': dense_dispatch}


def default_dispatch(platform: str | None = None) -> str:
  """The implementation 'auto' resolves to on this platform (cpu, gpu, tpu)."""
  del platform
  return 'einsum'


def get_dispatch(name: str) -> DispatchFn:
  """The dispatch function called `name`; 'auto' picks the platform default."""
  if name == 'auto':
    name = default_dispatch(jax.default_backend())
  if name not in DISPATCH:
    raise ValueError(f'dispatch={name!r} is not implemented; available: {", ".join(sorted(DISPATCH))}')
  return DISPATCH[name]
