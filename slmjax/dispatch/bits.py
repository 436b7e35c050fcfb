"""bf16 arrays handled as their uint16 bits where XLA:CPU would otherwise go through f32.

XLA:CPU's bf16 normalization runs a bf16 dynamic-update-slice, dynamic-slice or gather in f32. Inside a loop that
converts the whole operand: a tile written into a bf16 buffer converted the buffer there and back at every tile
(378 of a 1,404 ms bf16 mixtral-512 step, profiled), and a slice or gather read in a loop made XLA hoist an f32
copy of the whole operand out of it (every expert's weights, the rows, the residuals). On the bits these are
plain integer moves of the part they touch. Other dtypes pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_bits(a: jax.Array) -> jax.Array:
  """a's bits (uint16) when a is bf16, else a."""
  return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def from_bits(a: jax.Array, dtype) -> jax.Array:
  """The `dtype` array whose bits `a` holds (`as_bits` undone)."""
  return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def index_in_dim(a: jax.Array, i) -> jax.Array:
  """a[i] along axis 0 (a dynamic index), read on the bits."""
  return from_bits(jax.lax.dynamic_index_in_dim(as_bits(a), i, keepdims=False), a.dtype)
