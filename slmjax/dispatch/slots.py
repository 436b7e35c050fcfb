"""Capacity slots: where each assignment goes in its expert's buffer, and whether it fits.

Priority is token order (causal; see `slmjax.dispatch`): token 0's k assignments, then token 1's, and so on.

Shape letters: slmjax/shapes.py (here G, S, A, E and N = S * A, a group's assignments flattened).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def capacity_slots(experts_GSA: jax.Array, n_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Slot of each assignment inside its expert's buffer, and whether it fits (slot < capacity).

  Token-major priority: token 0's k assignments, then token 1's, and so on (causal; see `slmjax.dispatch`).
  """
  slot_GSA, kept_GSA, _ = slots_and_counts(experts_GSA, n_experts, capacity)
  return slot_GSA, kept_GSA


def slots_and_counts(experts_GSA, n_experts, capacity):
  """capacity_slots plus count_GE, the kept assignments per group and expert. The running count is an
  associative scan: on CPU 4x faster than jnp.cumsum (a reduce-window) at E=64."""
  G, S, A = experts_GSA.shape
  mask_GNE = jax.nn.one_hot(experts_GSA.reshape(G, S * A), n_experts, dtype=jnp.int32)
  count_GNE = jax.lax.associative_scan(jnp.add, mask_GNE, axis=1)  # assignments to e up to and including n
  slot_GSA = (jnp.sum(count_GNE * mask_GNE, axis=-1) - 1).reshape(G, S, A)
  return slot_GSA, slot_GSA < capacity, jnp.minimum(count_GNE[:, -1], capacity)
