"""The weighted gather-sum of gather_sum.cc as JAX calls: y[t] = sum_a w[t, a] src[dest[t, a]] (a token's output
from its rows in a buffer sorted by expert), and its backward, each one pass in one XLA:CPU call.

Why: XLA:CPU gathers bf16 rows as bits, converts each gathered [X, D] block to f32 in a pass of its own and sums
in another (slmjax/dispatch/rows.py); in a bf16 mixtral-512 step those passes were ~8% of the step. Built at first
use like the other handlers (slmjax/kernels/gemm.py), with -march=native; where they cannot build or load, `load`
says why and callers keep XLA's gathers.

Shape letters: slmjax/shapes.py (here X tokens, A assignments a token, N buffer rows, D).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
FLAGS = ('-O3', '-march=native')
_target = functools.partial(gemm.call_target, 'gather_sum')
# f32 operands smaller than this stay in XLA (its f32 ops are cheap there): the cpu ladder's 32x2 dropless MoE step
# (2048 x 32 rows) was 1.03x slower with the router and gather-sum calls in f32, 0.95x with them in bf16; 64x2
# (2048 x 64) 0.99x in f32 (interleaved, 2 cores).
MIN_F32_ELEMENTS = 2 ** 17
WIDTH = 16  # row widths must be multiples of this (one AVX-512 vector)


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  return gemm.load_calls(SOURCE, FLAGS, 'gather_sum', 'the gather-sum call')


def fits(src_ND: jax.Array) -> bool:
  """Whether the calls take rows src_ND: bf16, or f32 from MIN_F32_ELEMENTS on, of a width that is a multiple of
  WIDTH, on one CPU device, the handlers loaded."""
  return (src_ND.ndim == 2 and src_ND.shape[1] % WIDTH == 0 and gemm.row_call_pays(src_ND, MIN_F32_ELEMENTS)
          and load() is None)


def forward(src_ND: jax.Array, weight_XA: jax.Array, dest_XA: jax.Array) -> jax.Array:
  """y_XD[t] = sum_a weight_XA[t, a] src_ND[dest_XA[t, a]] in src's dtype (summed in f32), terms whose dest is
  outside [0, N) left out."""
  X, D = dest_XA.shape[0], src_ND.shape[1]
  call = gemm.ffi_call(_target('fwd', src_ND.dtype), jax.ShapeDtypeStruct((X, D), src_ND.dtype))
  return call(src_ND, weight_XA.astype(jnp.float32), dest_XA.astype(jnp.int32))


def backward(src_ND: jax.Array, weight_XA: jax.Array, dest_XA: jax.Array, asg_N: jax.Array,
             dy_XD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The cotangents of `forward`'s src and weight from dy_XD: dsrc_ND[n] = weight[asg_N[n]] dy[asg_N[n] // A]
  (asg_N[n] the flat assignment t * A + a that row n holds, outside [0, X * A) for none: a zero row), in src's
  dtype; dweight_XA[t, a] = <src[dest[t, a]], dy[t]> in f32 (zero where dropped)."""
  call = gemm.ffi_call(_target('bwd', src_ND.dtype), (jax.ShapeDtypeStruct(src_ND.shape, src_ND.dtype),
                                                      jax.ShapeDtypeStruct(dest_XA.shape, jnp.float32)))
  return call(src_ND, weight_XA.astype(jnp.float32), dest_XA.astype(jnp.int32), asg_N.astype(jnp.int32),
              dy_XD.astype(src_ND.dtype))
