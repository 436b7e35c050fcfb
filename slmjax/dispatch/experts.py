"""The experts' FFNs on per-expert row buffers: stacked weights, and batched matmuls over all experts at once.

`expert_ffn` is the plain one (the dense oracle, tests); `expert_ffn_rows` runs only a data-dependent prefix of
every expert's buffer, on a static bucket of rows, and is what the einsum and gather dispatches call.

Shape letters: slmjax/shapes.py (here E, M, D, F and P = 2F, gate and up side by side).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from slmjax.kernels.acc32 import einsum
from slmjax.layers import activate


class ExpertWeights(NamedTuple):
  """Stacked weights of E experts; `w_gate_EDF` is None for the ungated GELU FFN."""
  w_gate_EDF: jax.Array | None
  w_up_EDF: jax.Array
  w_down_EFD: jax.Array

  def cast(self, dtype) -> ExpertWeights:
    """The weights in `dtype`, the compute dtype. Dispatches receive the master weights (param_dtype) and each
    product casts them where it runs, so the fused SwiGLU call can read f32 masters itself and return f32
    gradients (slmjax/kernels/swiglu_ffn.py) with no bf16 copy made and no gradient rounded on the way."""
    return ExpertWeights(*(None if a is None else a.astype(dtype) for a in self))


def expert_ffn(x_EMD: jax.Array, w: ExpertWeights, activation: str) -> jax.Array:
  """Run expert e's FFN on the rows x_EMD[e], for all experts at once (batched matmuls), in x's dtype."""
  w = w.cast(x_EMD.dtype)
  up_EMF = einsum('EMD,EDF->EMF', x_EMD, w.w_up_EDF)
  gate_EMF = None if w.w_gate_EDF is None else einsum('EMD,EDF->EMF', x_EMD, w.w_gate_EDF)
  return einsum('EMF,EFD->EMD', activate(gate_EMF, up_EMF, activation), w.w_down_EFD)


FUSE_GATE_UP_MAX_F = 128  # fine-grained experts: one [D, 2F] matmul beats two narrow [D, F] ones (measured)


def expert_ffn_rows(x_EMD, w: ExpertWeights, n_rows, activation: str, buckets: tuple[int, ...]):
  """expert_ffn(x_EMD, w) on rows [0, n_rows) of every expert; later rows are don't-care (their output is
  arbitrary, their cotangent must be zero). The matmuls, forward and backward, run on the smallest static bucket
  >= n_rows rows, in x's dtype. Residuals are the pre-activations, so the backward recomputes only the cheap
  activation."""
  return _ffn_rows(x_EMD, w.cast(x_EMD.dtype), n_rows, activation, buckets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ffn_rows(x_EMD, w: ExpertWeights, n_rows, activation: str, buckets: tuple[int, ...]):
  return _ffn_rows_fwd(x_EMD, w, n_rows, activation, buckets)[0]


def _pad_rows(a_EMF, rows):
  return None if a_EMF is None else jnp.pad(a_EMF, ((0, 0), (0, rows - a_EMF.shape[1]), (0, 0)))


def _switch(n_rows, buckets, branch, *operands):
  if len(buckets) == 1:
    return branch(buckets[0], *operands)
  index = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), n_rows)
  return jax.lax.switch(index, [functools.partial(branch, b) for b in buckets], *operands)


def _fused(w: ExpertWeights) -> jax.Array | None:
  F = w.w_up_EDF.shape[-1]
  if w.w_gate_EDF is None or F > FUSE_GATE_UP_MAX_F:
    return None
  return jnp.concatenate([w.w_gate_EDF, w.w_up_EDF], axis=-1)


def _gate_up(pre, F):
  """(gate, up) from the saved pre-activations: (gu_EMP,) when fused, else (gate_EMF or None, up_EMF)."""
  return (pre[0][..., :F], pre[0][..., F:]) if len(pre) == 1 else pre


# In the branches below, `rows` is the bucket: x_EMD[:, :rows] is the part of the buffer the matmuls run on, and
# M is the whole buffer's row count, to which the results are padded back.
def _ffn_rows_fwd(x_EMD, w, n_rows, activation, buckets):
  def branch(rows, x_EMD, w, w_gu_EDP):
    M = x_EMD.shape[1]
    x_EMD = x_EMD[:, :rows]
    if w_gu_EDP is not None:
      pre = (einsum('EMD,EDP->EMP', x_EMD, w_gu_EDP),)
    else:
      pre = (None if w.w_gate_EDF is None else einsum('EMD,EDF->EMF', x_EMD, w.w_gate_EDF),
             einsum('EMD,EDF->EMF', x_EMD, w.w_up_EDF))
    h_EMF = activate(*_gate_up(pre, w.w_up_EDF.shape[-1]), activation)
    y_EMD = einsum('EMF,EFD->EMD', h_EMF, w.w_down_EFD)
    return _pad_rows(y_EMD, M), tuple(_pad_rows(p, M) for p in pre)
  w_gu_EDP = _fused(w)
  y_EMD, pre = _switch(n_rows, buckets, branch, x_EMD, w, w_gu_EDP)
  return y_EMD, (x_EMD, w, w_gu_EDP, n_rows, pre)


def _ffn_rows_bwd(activation, buckets, res, dy_EMD):
  def branch(rows, x_EMD, w, w_gu_EDP, pre, dy_EMD):
    M, F = x_EMD.shape[1], w.w_up_EDF.shape[-1]
    x_EMD, dy_EMD = x_EMD[:, :rows], dy_EMD[:, :rows]
    gate_EMF, up_EMF = _gate_up(tuple(None if p is None else p[:, :rows] for p in pre), F)
    h_EMF, act_vjp = jax.vjp(lambda g, u: activate(g, u, activation), gate_EMF, up_EMF)
    dgate_EMF, dup_EMF = act_vjp(einsum('EMD,EFD->EMF', dy_EMD, w.w_down_EFD))
    dw_down_EFD = einsum('EMF,EMD->EFD', h_EMF, dy_EMD)
    if w_gu_EDP is not None:
      dgu_EMP = jnp.concatenate([dgate_EMF, dup_EMF], axis=-1)
      dx_EMD = einsum('EMP,EDP->EMD', dgu_EMP, w_gu_EDP)
      dw_gu_EDP = einsum('EMD,EMP->EDP', x_EMD, dgu_EMP)
      return _pad_rows(dx_EMD, M), ExpertWeights(dw_gu_EDP[..., :F], dw_gu_EDP[..., F:], dw_down_EFD)
    dx_EMD = einsum('EMF,EDF->EMD', dup_EMF, w.w_up_EDF)
    dw_gate_EDF = None
    if gate_EMF is not None:
      dx_EMD = dx_EMD + einsum('EMF,EDF->EMD', dgate_EMF, w.w_gate_EDF)
      dw_gate_EDF = einsum('EMD,EMF->EDF', x_EMD, dgate_EMF)
    dw = ExpertWeights(dw_gate_EDF, einsum('EMD,EMF->EDF', x_EMD, dup_EMF), dw_down_EFD)
    return _pad_rows(dx_EMD, M), dw
  x_EMD, w, w_gu_EDP, n_rows, pre = res
  dx_EMD, dw = _switch(n_rows, buckets, branch, x_EMD, w, w_gu_EDP, pre, dy_EMD)
  return dx_EMD, dw, None


_ffn_rows.defvjp(_ffn_rows_fwd, _ffn_rows_bwd)
