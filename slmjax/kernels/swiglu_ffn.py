"""The SwiGLU FFN handlers of swiglu_ffn.cc as JAX calls: built and registered once a process, the raw forward
and backward on rows sorted by expert (slmjax/dispatch/fused_swiglu.py wraps them for the experts), and a dense
SwiGLU FFN made of the same calls. f32, and bf16 where the CPU has bf16 dot units (AVX512_BF16: products at
210-230 GFLOP/s a core here, against 105-116 for f32; activation and weight-gradient sums in f32, the gate / up
activations kept for the backward in bf16). The weights are read in f32 either way: callers pass the f32 master
weights uncast, the bf16 calls round them as they pack them, and their gradients leave in f32, so a bf16 step
makes no bf16 copy of them and rounds no gradient.

The handlers need only g++: built at first use like the GEMM handlers (slmjax/kernels/gemm.py), with
-march=native, and run on XLA's own intra-op threads, one expert at a time a thread. Where they cannot build or
load, `load` says why and callers keep XLA's ops.

The dense FFN splits d_ff into `parts` (one a core) and runs them as experts that each take every row, summing
their outputs: [4096, 256] rows, d_ff 1024, forward + backward 0.76-0.84x XLA's dots in f32; the cpu ladder's
widths (2048 rows, d_model 32) 0.88x (interleaved, 2 cores).

Shape letters: slmjax/shapes.py (here X source rows, E experts or parts, D, F, N rows sorted by expert, M rows, P
parts).
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp

from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
FLAGS = ('-O3', '-march=native')
# Widest layer the calls take, from A/B runs against the other paths (slmjax/dispatch/fused_swiglu.py has the MoE
# figures). Width 1024 (2026-12-05, 2-core AVX512_BF16 EPYC): bench_train's mixtral-1024 step 0.83-0.85x in bf16,
# 0.88x in f32 (experts of 1024 in the calls against grouped_ffn's tiles); a DenseFFN of d_ff 2048 (parts of 1024)
# 0.80-0.87x XLA's dots in bf16, 0.93-0.94x in f32. Width 2048 (d_ff 4096): 1.08-1.15x XLA in f32, a wash in bf16,
# so widths stop at 1024. d_model 512 (DenseFFN, d_ff 2048): 1.07-1.22x XLA's dots in f32, a wash in bf16, so
# d_model stops at 256.
MAX_D_MODEL, MAX_WIDTH = 256, 1024
# Fewest rows the dense FFN takes the calls for: measured from 2048 rows on; decode's few rows stay on XLA's dots
# (the split copies the gate and up weights each call).
DENSE_MIN_ROWS = 512
# The f32 calls are taken where the CPU has AVX-512. On an AVX2-only EPYC (Zen 1, 2 cores) they ran the dense FFN
# layer (4096 x 256 x 1024, forward + backward) 1.15x slower than XLA's dots, which reach ~61 GFLOP/s there, near
# the cores' peak, and whole llama / mixtral-512 steps 1.03 / 1.07x slower; the bf16 calls need AVX512_BF16 anyway.
F32_PAYS = gemm.cpu_has('avx512f')
_TARGETS = {'Fwd': 'fwd', 'Bwd': 'bwd', 'FwdBf16': 'fwd_bf16', 'BwdBf16': 'bwd_bf16'}  # handler -> target suffix
_targets: set[str] = set()  # the suffixes registered


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  if jax.default_backend() != 'cpu':
    return f'the fused SwiGLU FFN is for XLA:CPU, not {jax.default_backend()}'
  try:  # the bf16 handlers exist where the CPU has AVX512_BF16
    registered = gemm.register(SOURCE, FLAGS, {f'SlmjaxSwigluFfn{name}': f'slmjax_swiglu_ffn_{suffix}'
                                               for name, suffix in _TARGETS.items()})
  except (OSError, RuntimeError) as e:
    return f'cannot build the fused SwiGLU FFN: {e}'
  _targets.update(suffix for suffix in _TARGETS.values() if f'slmjax_swiglu_ffn_{suffix}' in registered)
  return None


def fits(D: int, F: int, x: jax.Array, *weights: jax.Array) -> bool:
  """Whether the calls take widths D and F (multiples of 32, up to MAX_D_MODEL and MAX_WIDTH), rows x in f32 (on
  AVX-512 CPUs: F32_PAYS), or
  in bf16 where this CPU has bf16 dot units (AVX512_BF16), and f32 or bf16 weights (the calls read f32 weights:
  pass the f32 master weights uncast, and their gradients come back in f32 with no cast either way), on one CPU
  device, the handlers loaded."""
  floats = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  return (D % 32 == 0 and F % 32 == 0 and D <= MAX_D_MODEL and F <= MAX_WIDTH
          and x.dtype in floats and all(w.dtype in floats for w in weights)
          and (x.dtype == jnp.bfloat16 or F32_PAYS)
          and gemm.on_one_cpu_device() and load() is None and _suffix('fwd', x.dtype) in _targets)


def _suffix(call: str, dtype) -> str:
  """The FFI target suffix of `call` ('fwd' or 'bwd') for operands of `dtype`."""
  return f'{call}_bf16' if dtype == jnp.bfloat16 else call


def _f32(*weights):
  """The weights as the calls read them: f32 (a no-op for f32 master weights)."""
  return tuple(w.astype(jnp.float32) for w in weights)


def forward(x_XD, row_src_N, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Expert e's SwiGLU FFN on its run of sorted rows (row n is x_XD[row_src_N[n]], sizes_E rows an expert, rows
  past the runs zero): y_ND and the gate and up activations the backward takes, all in x's dtype (computed in
  f32; bf16's rounded once)."""
  N, (D, F) = row_src_N.shape[0], w_up_EDF.shape[1:]
  out = lambda width: jax.ShapeDtypeStruct((N, width), x_XD.dtype)
  call = gemm.ffi_call(f'slmjax_swiglu_ffn_{_suffix("fwd", x_XD.dtype)}', (out(D), out(F), out(F)))
  return call(x_XD, row_src_N.astype(jnp.int32), sizes_E.astype(jnp.int32),
              *_f32(w_gate_EDF, w_up_EDF, w_down_EFD))


def backward(x_XD, row_src_N, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, gate_NF, up_NF, dy_ND):
  """The cotangents of `forward`'s sorted rows (dx_ND, not yet summed into x_XD's rows) and of the weights, in
  their dtypes (summed in f32; bf16 weights' gradients rounded once)."""
  w = (w_gate_EDF, w_up_EDF, w_down_EFD)
  call = gemm.ffi_call(f'slmjax_swiglu_ffn_{_suffix("bwd", x_XD.dtype)}',
                       (jax.ShapeDtypeStruct(dy_ND.shape, x_XD.dtype),
                        *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in w)))
  dx_ND, *dw = call(x_XD, row_src_N.astype(jnp.int32), sizes_E.astype(jnp.int32), *_f32(*w), gate_NF, up_NF,
                    dy_ND.astype(x_XD.dtype))
  return dx_ND, *(d.astype(a.dtype) for d, a in zip(dw, w))


def _cores() -> int:
  """The CPU cores this process may run on (XLA's intra-op threads are as many)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def dense_parts(x_MD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
                matmul: str) -> int:
  """How many parts of d_ff the dense SwiGLU FFN runs as, one a core where the width divides (0: keep XLA's
  dots): `matmul` 'auto', at least DENSE_MIN_ROWS rows, the parts' widths and the dtypes within `fits`."""
  (M, D), F = x_MD.shape, w_up_DF.shape[1]
  if matmul != 'auto' or M < DENSE_MIN_ROWS:
    return 0
  for P in range(_cores(), 0, -1):
    if F % P == 0 and fits(D, F // P, x_MD, w_gate_DF, w_up_DF, w_down_FD):
      return P
  return 0


def _parted(w_gate_DF, w_up_DF, w_down_FD, P):
  """The weights as P experts of d_ff / P columns each."""
  (D, F), Fp = w_up_DF.shape, w_up_DF.shape[1] // P
  split = lambda w_DF: w_DF.reshape(D, P, Fp).transpose(1, 0, 2)
  return split(w_gate_DF), split(w_up_DF), w_down_FD.reshape(P, Fp, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dense_ffn(x_MD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array, parts: int):
  """silu(x w_gate) (x w_up) w_down, d_ff split into `parts` (`dense_parts`) that each take every row."""
  return _dense_fwd(x_MD, w_gate_DF, w_up_DF, w_down_FD, parts)[0]


def _sum_parts(y_ND: jax.Array, P: int) -> jax.Array:
  """The P parts' [M, D] blocks of y_ND added (as adds XLA fuses into one loop: a reduce over P became a YNNPACK
  reduction that made the layer's forward + backward 1.45x slower at d_model 32)."""
  return functools.reduce(jnp.add, jnp.split(y_ND, P))


def _rows(M: int, P: int):
  """Every row once for each part, and each part's size."""
  return jnp.tile(jnp.arange(M, dtype=jnp.int32), P), jnp.full((P,), M, jnp.int32)


def _dense_fwd(x_MD, w_gate_DF, w_up_DF, w_down_FD, parts):
  (M, D), P = x_MD.shape, parts
  w = _parted(w_gate_DF, w_up_DF, w_down_FD, P)
  y_ND, gate_NF, up_NF = forward(x_MD, *_rows(M, P), *w)
  return _sum_parts(y_ND, P), (x_MD, w, gate_NF, up_NF)


def _dense_bwd(parts, res, dy_MD):
  x_MD, w, gate_NF, up_NF = res
  (M, D), P = x_MD.shape, parts
  dy_ND = jnp.broadcast_to(dy_MD[None], (P, M, D)).reshape(P * M, D)
  dx_ND, dw_gate_PDF, dw_up_PDF, dw_down_PFD = backward(x_MD, *_rows(M, P), *w, gate_NF, up_NF, dy_ND)
  join = lambda dw_PDF: dw_PDF.transpose(1, 0, 2).reshape(D, -1)
  return _sum_parts(dx_ND, P), join(dw_gate_PDF), join(dw_up_PDF), dw_down_PFD.reshape(-1, D)


dense_ffn.defvjp(_dense_fwd, _dense_bwd)
