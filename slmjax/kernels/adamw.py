"""slmjax's AdamW step as one XLA:CPU call a parameter (adamw.cc): clipping factor, moments, bias correction,
weight decay and learning rate in one pass over the parameter, its gradient and its two moments, written in place.

Why: XLA:CPU runs optax's AdamW as three loops a parameter (each moment, then the parameter: ten arrays of traffic
where seven do); for a MoE model that is 3x the parameters of a dense one of the same active size, so the
optimizer is a larger share of its step. Built at first use like the other handlers (slmjax/kernels/gemm.py);
where it cannot build or load, `load` says why and slmjax/optim.py keeps optax's update.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from slmjax.kernels import gemm

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
# No FMA contraction, so each operation rounds as optax's do; no errno, so the square root vectorizes.
FLAGS = ('-O3', '-march=native', '-ffp-contract=off', '-fno-math-errno')
TARGET = 'slmjax_adamw'
# Parameters smaller than this stay in XLA: a call a parameter costs more than XLA's loops over a small one (the
# cpu ladder's 32x2 dense step, all of whose parameters are under it, 1.02-1.03x slower with every one a call;
# interleaved, 2 cores).
MIN_ELEMENTS = 2 ** 14


@functools.cache
def load() -> str | None:
  """Builds the handler and registers its FFI target once a process; None when ready, else why not (one line)."""
  return gemm.register_all(SOURCE, FLAGS, {'SlmjaxAdamw': TARGET}, 'the AdamW call')


def fits(*arrays: jax.Array) -> bool:
  """Whether the call takes these parameters, gradients and moments: all f32, on one CPU device, the handler
  loaded."""
  return (all(a.dtype == jnp.float32 for a in arrays) and gemm.on_one_cpu_device() and load() is None)


def step(p, g, m, v, hyper_10: jax.Array):
  """(p, m, v) after one AdamW step from gradient g: hyper_10 holds, in f32, the clipping factor, 1 - b1, b1,
  1 - b2, b2, 1 - b1^t, 1 - b2^t, eps, the weight decay (0 where masked) and -lr. From MIN_ELEMENTS on one call,
  p, m and v updated in place where XLA can (donated buffers); smaller parameters the same arithmetic in XLA."""
  if p.size < MIN_ELEMENTS:
    return _step_in_xla(p, g, m, v, hyper_10)
  out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
  call = jax.ffi.ffi_call(TARGET, (out, out, out), input_output_aliases={0: 0, 2: 1, 3: 2},
                          vmap_method='sequential')
  return call(p, g, m, v, hyper_10)


def _step_in_xla(p, g, m, v, hyper_10):
  """What the call computes, in the same order (optax's)."""
  scale, one_m_b1, b1, one_m_b2, b2, bias1, bias2, eps, decay, neg_lr = (hyper_10[i] for i in range(10))
  g = g * scale
  m = one_m_b1 * g + b1 * m
  v = one_m_b2 * (g * g) + b2 * v
  u = (m / bias1) / (jnp.sqrt(v / bias2) + eps) + decay * p
  return p + u * neg_lr, m, v
