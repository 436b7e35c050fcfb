"""bf16 matmuls and einsums accumulated in f32 inside XLA's dot, forward and backward: the form XLA:CPU hands to
YNNPACK's bf16 kernels (AVX512_BF16 / AMX dot products). A bf16-out dot is upcast and runs at f32 speed
instead (GEMMs at 4096 rows: 200-291 against 84-143 GFLOP/s on a 2-core AVX512_BF16 CPU; README, Speed).
Operands of other dtypes take the plain einsum, unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _acc32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec, a, b):
  return _acc32(spec, a, b)


def _fwd(spec, a, b):
  return _acc32(spec, a, b), (a, b)


def _bwd(spec, res, g):
  """Each operand's cotangent is the einsum of the output's with the other operand, in bf16 with f32
  accumulation (autodiff of a preferred-f32 einsum would give the backward an f32 cotangent: f32 speed)."""
  a, b = res
  ins, out = spec.split('->')
  sa, sb = ins.split(',')
  g = g.astype(a.dtype)
  return _acc32(f'{out},{sb}->{sa}', g, b), _acc32(f'{sa},{out}->{sb}', a, g).astype(b.dtype)


_einsum.defvjp(_fwd, _bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum of two operands (explicit '->'; every index of an operand in the output or the other operand,
  as in any matmul), differentiable; for two bf16 operands every product (forward and both cotangents)
  accumulates in f32 and returns bf16."""
  if a.dtype == b.dtype == jnp.bfloat16:
    return _einsum(spec, a, b)
  return jnp.einsum(spec, a, b)


def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """x_MK @ w_KN through `einsum`."""
  return einsum('MK,KN->MN', x_MK, w_KN)
