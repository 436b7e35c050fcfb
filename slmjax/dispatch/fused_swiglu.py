"""The dropless SwiGLU expert FFN of narrow f32 experts as two XLA:CPU FFI calls (slmjax/kernels/swiglu_ffn.cc):
`grouped_ffn`'s contract (rows x_XD[row_src_N] sorted by expert, sizes_E each; the output in the sorted layout),
forward and backward each one call instead of a loop of XLA ops per tile.

Why: at the cpu ladder's widths (d_model 32-128) `grouped_ffn`'s row tiles are mostly XLA's per-op cost (a
[512, 32] x [32, 64] product runs at a third of a large one's FLOP rate, plus a slice, a gather and writes per
tile), so a dropless MoE step took 1.4-1.7x the dense step at d_model 32; with many narrow experts (64 of 64 at
d_model 256) the tiles' small products made the layer 2.2-2.3x a dense FFN of the same FLOPs. Built at first use like the GEMM
handlers (slmjax/kernels/gemm.py), with -march=native; runs on XLA's own threads; where it cannot build or load,
`runs` says no and the row tiles run instead.

Shape letters: slmjax/shapes.py (here X source rows, A, E, D, F, N rows sorted by expert plus slack).
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp

from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.rows import sum_rows
from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).parents[1] / 'kernels' / 'swiglu_ffn.cc'
FLAGS = ('-O3', '-march=native')
# Widest layer the call takes, from interleaved A/B runs against the row tiles (MoE / dense step or layer):
# the cpu ladder's dropless MoE (d_model 32-128) 1.64 / 1.45 / 1.40 / 1.27 -> 1.17 / 1.16 / 1.19 / 1.21 with the
# first kernels; bench_moe's fine layer (d_model 256, 64 experts of 64) 2.28 -> 1.44, its coarse one (8 of 512)
# 1.11 -> 1.03; bench_train's mixtral-512 step 1110 -> 925 ms, mixtral-1024 (experts of 1024) a wash (1583 vs
# 1607 ms), so not taken there. Wider layers are not measured (and each thread keeps 3 d_model x width floats).
MAX_D_MODEL, MAX_EXPERT_WIDTH = 256, 512
_registered = []  # the loaded library, once its FFI targets are registered: XLA refuses a second registration


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  if jax.default_backend() != 'cpu':
    return f'the fused SwiGLU FFN is for XLA:CPU, not {jax.default_backend()}'
  if _registered:
    return None
  try:
    lib = ctypes.CDLL(str(gemm.build(source=SOURCE, flags=FLAGS)))
  except (OSError, RuntimeError) as e:
    return f'cannot build the fused SwiGLU FFN: {e}'
  for name in ('Fwd', 'Bwd'):
    handler = jax.ffi.pycapsule(getattr(lib, f'SlmjaxSwigluFfn{name}'))
    jax.ffi.register_ffi_target(f'slmjax_swiglu_ffn_{name.lower()}', handler, platform='cpu')
  _registered.append(lib)
  return None


def runs(x_XD: jax.Array, w: ExpertWeights, activation: str, matmul: str) -> bool:
  """Whether the fused call takes this layer: SwiGLU, f32, widths multiples of 32 up to MAX_D_MODEL and
  MAX_EXPERT_WIDTH, one CPU device, `matmul` 'auto' (ModelConfig.matmul: 'xla' keeps everything in XLA, a vendor
  GEMM keeps the tiles)."""
  D, F = w.w_up_EDF.shape[1:]
  return (matmul == 'auto' and activation == 'swiglu' and w.w_gate_EDF is not None
          and all(a.dtype == jnp.float32 for a in (x_XD, *w))
          and D % 32 == 0 and F % 32 == 0 and D <= MAX_D_MODEL and F <= MAX_EXPERT_WIDTH
          and gemm.on_one_cpu_device() and load() is None)


@jax.custom_vjp
def swiglu_ffn(x_XD: jax.Array, row_src_N: jax.Array, dest_XA: jax.Array, w: ExpertWeights, sizes_E: jax.Array):
  """Expert e's SwiGLU FFN on its run of sorted rows (`grouped_ffn`'s arguments, its activation fixed); rows past
  the runs come out zero."""
  return _fwd(x_XD, row_src_N, dest_XA, w, sizes_E)[0]


def _fwd(x_XD, row_src_N, dest_XA, w, sizes_E):
  N, (D, F) = row_src_N.shape[0], w.w_up_EDF.shape[1:]
  out = lambda width: jax.ShapeDtypeStruct((N, width), jnp.float32)
  call = jax.ffi.ffi_call('slmjax_swiglu_ffn_fwd', (out(D), out(F), out(F)))
  y_ND, gate_NF, up_NF = call(x_XD, row_src_N.astype(jnp.int32), sizes_E.astype(jnp.int32), *w)
  return y_ND, (x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF)


def _bwd(res, dy_ND):
  x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF = res
  N, D = dy_ND.shape
  call = jax.ffi.ffi_call('slmjax_swiglu_ffn_bwd', (jax.ShapeDtypeStruct((N, D), jnp.float32),
                                                    *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in w)))
  dx_ND, *dw = call(x_XD, row_src_N.astype(jnp.int32), sizes_E.astype(jnp.int32), *w, gate_NF, up_NF,
                    dy_ND.astype(jnp.float32))
  return sum_rows((dx_ND,), dest_XA), None, None, ExpertWeights(*dw), None


swiglu_ffn.defvjp(_fwd, _bwd)
