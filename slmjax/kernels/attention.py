"""Causal softmax attention in one XLA:CPU call each way (attention.cc): the forward and backward (f32 or bf16
operands, f32 arithmetic) of slmjax/attention_core.py's attention, for training on CPU, where XLA's batched GEMMs
and softmax loops run at 40-50 GFLOP/s at 256 positions.

The backward takes the forward's output and logsumexp (one float a query) and recomputes the probabilities, as
flash attention does. Built at first use like the other handlers (slmjax/kernels/gemm.py), with -march=native;
where they cannot build or load, `load` says why and attention keeps XLA's ops. bf16 operands are read into
f32 copies a task at a time inside the call (scores, softmax and products in f32) and the results rounded to
bf16 once. Under `jax.vmap` the calls run once per mapped element (`gemm.ffi_call`).

Operands stay in the projections' token-major layout (q [B, T, K, Q, Z], k [B, U, K, Z], v [B, U, K, Y]): the
call reads and writes them with strides, so no heads-major copies are made either way.

Shape letters: slmjax/shapes.py (B batch, K key/value heads, Q query heads a key head, T query positions, U key
positions, Z query/key width, Y value width).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
FLAGS = ('-O3', '-march=native')
_target = functools.partial(gemm.call_target, 'attention')
WIDTH = 32  # positions and head widths must be multiples of this (the product kernel's columns)


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  return gemm.load_calls(SOURCE, FLAGS, 'attention', 'the attention call')


def fits(q_BTKQZ: jax.Array, k_BUKZ: jax.Array, v_BUKY: jax.Array, cap: float, window: int,
         matmul: str = 'auto') -> bool:
  """Whether the call takes this attention: `matmul` 'auto' (ModelConfig.matmul: 'xla' keeps XLA's ops), causal
  over all keys (no soft-cap, no window), U = T, T, Z and Y multiples of WIDTH, f32 or bf16 operands of one
  dtype, on one CPU device, the handlers loaded."""
  T, Z, (U, Y) = q_BTKQZ.shape[1], q_BTKQZ.shape[4], (v_BUKY.shape[1], v_BUKY.shape[3])
  return (matmul == 'auto' and not cap and not window and U == T
          and T % WIDTH == 0 and Z % WIDTH == 0 and Y % WIDTH == 0
          and len({q_BTKQZ.dtype, k_BUKZ.dtype, v_BUKY.dtype}) == 1
          and q_BTKQZ.dtype in (jnp.float32, jnp.bfloat16)
          and gemm.on_one_cpu_device() and load() is None)


def _forward(q_BTKQZ, k_BUKZ, v_BUKY, scale):
  (B, T, K, Q, _), Y = q_BTKQZ.shape, v_BUKY.shape[3]
  call = gemm.ffi_call(_target('fwd', q_BTKQZ.dtype), (jax.ShapeDtypeStruct((B, T, K, Q, Y), q_BTKQZ.dtype),
                                                       jax.ShapeDtypeStruct((B, K, Q, T), jnp.float32)))
  return call(q_BTKQZ, k_BUKZ, v_BUKY, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q_BTKQZ: jax.Array, k_BUKZ: jax.Array, v_BUKY: jax.Array, scale: float) -> jax.Array:
  """softmax(scale q k^T + causal mask) v in the call (`fits`), on the projections' token-major operands as they
  are (the call reads them with strides: no heads-major copies); out_BTKQY in q's dtype."""
  return _forward(q_BTKQZ, k_BUKZ, v_BUKY, scale)[0]


def _attention_fwd(q_BTKQZ, k_BUKZ, v_BUKY, scale):
  out_BTKQY, lse_BKQT = _forward(q_BTKQZ, k_BUKZ, v_BUKY, scale)
  return out_BTKQY, (q_BTKQZ, k_BUKZ, v_BUKY, out_BTKQY, lse_BKQT)


def _attention_bwd(scale, saved, dout_BTKQY):
  q_BTKQZ, k_BUKZ, v_BUKY, out_BTKQY, lse_BKQT = saved
  call = gemm.ffi_call(_target('bwd', q_BTKQZ.dtype), tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                            for a in (q_BTKQZ, k_BUKZ, v_BUKY)))
  return tuple(call(q_BTKQZ, k_BUKZ, v_BUKY, out_BTKQY, lse_BKQT, dout_BTKQY.astype(q_BTKQZ.dtype),
                    scale=np.float32(scale)))


attention.defvjp(_attention_fwd, _attention_bwd)
