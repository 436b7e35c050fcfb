"""Moving token rows into expert buffers and back with gathers only (no scatter-add), forward and backward.

A row buffer may come in segments (a tuple of [N_i, D] arrays, indexed as if concatenated) so that the expert
blocks of different shapes in `gather_dispatch` never need a concatenate or a slice (each one a full copy).

Shape letters: slmjax/shapes.py (here X tokens, A, D and N rows of a buffer or of a flattened [X, A]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.dispatch.bits import as_bits, from_bits
from slmjax.kernels import gather_sum


def take_rows(src_ND: jax.Array, idx: jax.Array) -> jax.Array:
  """src_ND[idx] with out-of-range indices clamped: one gather pass (mode='fill' adds a select pass over the
  whole output); callers mask the rows an out-of-range 'empty' index reads. bf16 rows move as their bits:
  XLA:CPU gathers bf16 in f32, converting the whole source first (slmjax/dispatch/bits.py)."""
  return from_bits(jnp.take(as_bits(src_ND), idx, axis=0, mode='clip'), src_ND.dtype)


def _take_segments(segments, idx_X: jax.Array) -> jax.Array:
  """Rows idx of the segments' concatenation (out-of-range indices read an arbitrary row)."""
  rows_XD, offset = None, 0
  for seg_ND in segments:
    here_XD = take_rows(seg_ND, idx_X - offset)
    rows_XD = here_XD if rows_XD is None else jnp.where((idx_X >= offset)[:, None], here_XD, rows_XD)
    offset += seg_ND.shape[0]
  return rows_XD


def _rows(segments) -> int:
  return sum(seg.shape[0] for seg in segments)


# Sums over A are written out per assignment: XLA then fuses the A gathers into one loop instead of materialising
# [X, A, D] and reducing it in another kernel (6% of the layer at E=64, k=8 on CPU).
@jax.custom_vjp
def dispatch_rows(x_XD: jax.Array, tokens: tuple[jax.Array, ...], dest_XA: jax.Array) -> tuple[jax.Array, ...]:
  """Buffer segments x_XD[token_N] for each token_N in `tokens`. Empty rows (token == X) hold an arbitrary
  token's row: nothing reads their output and their cotangent is zero. `dest_XA` is the inverse map (row of each
  of a token's assignments in the concatenated buffer, past its end if dropped), so the backward is a gather
  too: dx[t] = sum_a dbuf[dest[t, a]]."""
  return tuple(take_rows(x_XD, token_N) for token_N in tokens)


def _dispatch_rows_fwd(x_XD, tokens, dest_XA):
  return dispatch_rows(x_XD, tokens, dest_XA), dest_XA


def sum_rows(bufs: tuple[jax.Array, ...], dest_XA: jax.Array) -> jax.Array:
  """dx[t] = sum_a buf[dest[t, a]] over the concatenated segments `bufs` (zero where dest is past the end):
  the cotangent of x for rows gathered from it, as a gather (one buffer on CPU: one gather-sum call)."""
  if len(bufs) == 1 and gather_sum.fits(bufs[0]):
    return gather_sum.forward(bufs[0], jnp.ones(dest_XA.shape, jnp.float32), dest_XA)
  N = _rows(bufs)
  return sum(jnp.where((dest_XA[:, a] < N)[:, None], _take_segments(bufs, dest_XA[:, a]), 0)
             for a in range(dest_XA.shape[1]))


def _dispatch_rows_bwd(dest_XA, dbufs):
  return sum_rows(dbufs, dest_XA), (None,) * len(dbufs), None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


def _one_call(ys: tuple[jax.Array, ...], weight_XA: jax.Array) -> bool:
  """Whether combine_rows runs as gather-sum calls: one buffer, weights of its dtype, what the calls take."""
  return len(ys) == 1 and weight_XA.dtype == ys[0].dtype and gather_sum.fits(ys[0])


@jax.custom_vjp
def combine_rows(ys: tuple[jax.Array, ...], weight_XA: jax.Array, dest_XA: jax.Array,
                 asgs: tuple[jax.Array, ...]) -> jax.Array:
  """y[t] = sum_a weight[t, a] * buf[dest[t, a]] over the concatenated buffer segments `ys`, zero where dest is
  past the end (dropped). `asgs` is the inverse map (flat assignment t * A + a held by each row of each segment,
  X * A if empty), so the backward gathers instead of scatter-adding into the buffer. One buffer on CPU: one
  gather-sum call each way (slmjax/kernels/gather_sum.py)."""
  if _one_call(ys, weight_XA):
    return gather_sum.forward(ys[0], weight_XA, dest_XA)
  N = _rows(ys)
  return sum(jnp.where((dest_XA[:, a] < N)[:, None], _take_segments(ys, dest_XA[:, a]) * weight_XA[:, a, None], 0)
             for a in range(dest_XA.shape[1]))


def _combine_rows_fwd(ys, weight_XA, dest_XA, asgs):
  return combine_rows(ys, weight_XA, dest_XA, asgs), (ys, weight_XA, dest_XA, asgs)


def _combine_rows_bwd(res, dy_XD):
  ys, weight_XA, dest_XA, asgs = res
  if _one_call(ys, weight_XA):
    dy_ND, dweight_XA = gather_sum.backward(ys[0], weight_XA, dest_XA, asgs[0], dy_XD)
    return (dy_ND,), dweight_XA.astype(weight_XA.dtype), None, (None,)
  X, A = dest_XA.shape
  weight_N = weight_XA.reshape(-1)
  dys = tuple(take_rows(dy_XD, asg_N // A) * jnp.where(asg_N < X * A, take_rows(weight_N, asg_N), 0)[:, None]
              for asg_N in asgs)
  dweight_XA = jnp.stack([jnp.sum(_take_segments(ys, dest_XA[:, a]) * dy_XD, axis=-1) for a in range(A)], axis=1)
  return dys, jnp.where(dest_XA < _rows(ys), dweight_XA, 0), None, (None,) * len(asgs)


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
