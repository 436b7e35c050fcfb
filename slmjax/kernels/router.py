"""The MoE router's product, logits = x w in f32, as one XLA:CPU call each way (router.cc): x f32 or bf16 read as
it is, w f32, the backward's dx in x's dtype and dw in f32.

Why: for a bf16 x XLA:CPU makes an f32 copy of x [X, D] for the f32 product and keeps it for the backward, and
runs the weight gradient x^T dlogits ([D, X] x [X, E], E = 8) on one thread, ~1 ms a layer at 4096 x 256. Built at
first use like the other handlers (slmjax/kernels/gemm.py); where it cannot build or load, `load` says why and the
router keeps XLA's einsum.

Shape letters: slmjax/shapes.py (here X tokens, D, E experts).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
FLAGS = ('-O3', '-march=native')
_target = functools.partial(gemm.call_target, 'router')
# f32 operands smaller than this stay in XLA (measured with the gather-sum calls: gather_sum.MIN_F32_ELEMENTS).
MIN_F32_ELEMENTS = 2 ** 17
WIDTH = 16  # d_model must be a multiple of this


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  return gemm.load_calls(SOURCE, FLAGS, 'router', 'the router call')


def fits(x_XD: jax.Array, w_DE: jax.Array) -> bool:
  """Whether the calls take this product: x bf16, or f32 from MIN_F32_ELEMENTS on, of a width that is a multiple
  of WIDTH, w f32, on one CPU device, the handlers loaded."""
  return (x_XD.ndim == 2 and x_XD.shape[1] % WIDTH == 0 and w_DE.dtype == jnp.float32
          and gemm.row_call_pays(x_XD, MIN_F32_ELEMENTS) and load() is None)


@jax.custom_vjp
def logits(x_XD: jax.Array, w_DE: jax.Array) -> jax.Array:
  """x w in f32 (x's bf16 values exact in f32: the product XLA's f32 einsum computes)."""
  X, E = x_XD.shape[0], w_DE.shape[1]
  return gemm.ffi_call(_target('fwd', x_XD.dtype), jax.ShapeDtypeStruct((X, E), jnp.float32))(x_XD, w_DE)


def _fwd(x_XD, w_DE):
  return logits(x_XD, w_DE), (x_XD, w_DE)


def _bwd(res, dlogits_XE):
  x_XD, w_DE = res
  call = gemm.ffi_call(_target('bwd', x_XD.dtype), (jax.ShapeDtypeStruct(x_XD.shape, x_XD.dtype),
                                                    jax.ShapeDtypeStruct(w_DE.shape, jnp.float32)))
  return call(x_XD, w_DE, dlogits_XE.astype(jnp.float32))


logits.defvjp(_fwd, _bwd)
