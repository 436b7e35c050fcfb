"""Causal softmax attention in one XLA:CPU call each way (attention.cc): the f32 forward and backward of
slmjax/attention_core.py's attention, for training on CPU, where XLA's batched GEMMs and softmax loops run at
40-50 GFLOP/s at 256 positions.

The backward takes the forward's output and logsumexp (one float a query) and recomputes the probabilities, as
flash attention does. Built at first use like the other handlers (slmjax/kernels/gemm.py), with -march=native;
where they cannot build or load, `load` says why and attention keeps XLA's ops. bf16 operands run the f32 call
on f32 copies. Under `jax.vmap` the calls run once per mapped element (vmap_method 'sequential').

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
WIDTH = 32  # positions and head widths must be multiples of this (the product kernel's columns)


@functools.cache
def load() -> str | None:
  """Builds the handlers and registers their FFI targets once a process; None when ready, else why not (one
  line)."""
  if jax.default_backend() != 'cpu':
    return f'the attention call is for XLA:CPU, not {jax.default_backend()}'
  try:
    gemm.register(SOURCE, FLAGS, {'SlmjaxAttentionFwd': 'slmjax_attention_fwd',
                                  'SlmjaxAttentionBwd': 'slmjax_attention_bwd'})
  except (OSError, RuntimeError) as e:
    return f'cannot build the attention call: {e}'
  return None


def fits(q_BKQTZ: jax.Array, k_BKUZ: jax.Array, v_BKUY: jax.Array, cap: float, window: int) -> bool:
  """Whether the call takes this attention: causal over all keys (no soft-cap, no window), U = T, T, Z and Y
  multiples of WIDTH, f32 or bf16 operands of one dtype, on one CPU device, the handlers loaded."""
  T, Z, (U, Y) = q_BKQTZ.shape[3], q_BKQTZ.shape[4], v_BKUY.shape[2:]
  return (not cap and not window and U == T and T % WIDTH == 0 and Z % WIDTH == 0 and Y % WIDTH == 0
          and len({q_BKQTZ.dtype, k_BKUZ.dtype, v_BKUY.dtype}) == 1
          and q_BKQTZ.dtype in (jnp.float32, jnp.bfloat16)
          and gemm.on_one_cpu_device() and load() is None)


def _f32(*arrays):
  """The arrays as f32 (the call's operand type; a no-op for f32)."""
  return tuple(a.astype(jnp.float32) for a in arrays)


def _forward(q_BKQTZ, k_BKUZ, v_BKUY, scale):
  (B, K, Q, T, _), Y = q_BKQTZ.shape, v_BKUY.shape[3]
  call = jax.ffi.ffi_call('slmjax_attention_fwd', (jax.ShapeDtypeStruct((B, K, Q, T, Y), jnp.float32),
                                                  jax.ShapeDtypeStruct((B, K, Q, T), jnp.float32)),
                       vmap_method='sequential')
  return call(*_f32(q_BKQTZ, k_BKUZ, v_BKUY), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q_BKQTZ: jax.Array, k_BKUZ: jax.Array, v_BKUY: jax.Array, scale: float) -> jax.Array:
  """softmax(scale q k^T + causal mask) v over heads-major operands, in the call (`fits`); out_BKQTY in q's
  dtype."""
  return _forward(q_BKQTZ, k_BKUZ, v_BKUY, scale)[0].astype(q_BKQTZ.dtype)


def _attention_fwd(q_BKQTZ, k_BKUZ, v_BKUY, scale):
  out_BKQTY, lse_BKQT = _forward(q_BKQTZ, k_BKUZ, v_BKUY, scale)
  return out_BKQTY.astype(q_BKQTZ.dtype), (q_BKQTZ, k_BKUZ, v_BKUY, out_BKQTY, lse_BKQT)


def _attention_bwd(scale, saved, dout_BKQTY):
  q_BKQTZ, k_BKUZ, v_BKUY, out_BKQTY, lse_BKQT = saved
  call = jax.ffi.ffi_call('slmjax_attention_bwd', tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32)
                                                        for a in (q_BKQTZ, k_BKUZ, v_BKUY)),
                       vmap_method='sequential')
  grads = call(*_f32(q_BKQTZ, k_BKUZ, v_BKUY), out_BKQTY, lse_BKQT, dout_BKQTY.astype(jnp.float32),
               scale=np.float32(scale))
  return tuple(g.astype(a.dtype) for g, a in zip(grads, (q_BKQTZ, k_BKUZ, v_BKUY)))


attention.defvjp(_attention_fwd, _attention_bwd)
