"""The gather dispatch: drops exactly what einsum drops, but moves rows with gathers, not one-hot tensors.

Token rows are gathered into per-expert buffers (G * C rows per expert, cut into a base block of the balanced
load and a tail block), the tail's matmuls run only on the rows the busiest expert uses (rounded up to a static
bucket), and every token gathers its k output rows back.

Shape letters: slmjax/shapes.py (here G, S, A, E, C, D, X = G * S tokens, M rows of one block of an expert's
buffer, N rows of all blocks of all experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slmjax.axes import constrain
from slmjax.dispatch.experts import ExpertWeights, expert_ffn_rows
from slmjax.dispatch.grouped import GROUP_TILE, row_tiles_pay, rows_ffn
from slmjax.dispatch.rows import combine_rows, dispatch_rows
from slmjax.dispatch.slots import slots_and_counts


def expert_blocks(rows: int, balanced: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
  """How the per-expert buffer of `rows` rows is cut: ((block rows, row buckets), ...).

  A base block of the balanced load (every expert's fair share, rounded down to 8 rows) is always computed; the
  tail block above it runs on the smallest static bucket that holds the busiest expert (a lax.switch), in steps
  of 1/8 of the tail up to half the balanced load, then in steps of 1.5x up to the whole tail: a dropless layer
  (rows = every token of the group) pays for its busiest expert's load, not for E times the balanced one.
  Separate blocks, not one buffer cut by the switch, because cutting and re-padding a buffer copies it (6% of
  the layer at E=8, k=2 on CPU).
  """
  base = min(rows, balanced // 8 * 8)
  tail = rows - base
  if base == 0 or tail == 0:
    base, tail = 0, rows
  fine_end = min(tail, max(balanced // 2, 8))
  step = max(8, -(-fine_end // 64) * 8)
  buckets = list(range(step, fine_end, step))
  bucket = fine_end
  while bucket < tail:
    buckets.append(bucket)
    bucket = -(-bucket * 3 // 2 // 8) * 8
  return ((base, (base,)),) * (base > 0) + ((tail, tuple(buckets) + (tail,)),)


def _row_in_expert(experts_GSA, slot_GSA, count_GE):
  """Row of each assignment among its expert's kept rows, groups packed from the front (group g's rows follow
  those of groups < g)."""
  G, S, A = experts_GSA.shape
  start_GE = jnp.cumsum(count_GE, axis=0) - count_GE
  return jnp.take_along_axis(start_GE, experts_GSA.reshape(G, S * A), axis=1).reshape(G, S, A) + slot_GSA


def _assignment_of_row(dest_XA, N: int):
  """The inverse map of dest_XA: the flat assignment t * A + a held by each of N rows (X * A where none)."""
  XA = dest_XA.size
  return jnp.full((N,), XA, jnp.int32).at[dest_XA.reshape(-1)].set(jnp.arange(XA, dtype=jnp.int32), mode='drop')


def expert_rows(experts_GSA, slot_GSA, kept_GSA, count_GE, blocks: tuple[int, ...]):
  """Where each kept assignment goes in the per-expert buffer: row r of expert e (experts' rows packed from the
  front across groups: group g's rows follow those of groups < g) lives in the block holding r; blocks are laid
  out one after the other, each as [E, block rows].

  Returns dest_XA (buffer row, past the end if dropped), asgs (per block: the flat assignment t * A + a in each
  row, X * A if empty) and n_rows (rows the busiest expert uses).
  """
  G, S, A = experts_GSA.shape
  E, N, X = count_GE.shape[1], count_GE.shape[1] * sum(blocks), G * S
  row_GSA = _row_in_expert(experts_GSA, slot_GSA, count_GE)
  dest_GSA, first, offset = jnp.full(experts_GSA.shape, N, jnp.int32), 0, 0
  for size in blocks:
    here_GSA = (row_GSA >= first) & (row_GSA < first + size)
    dest_GSA = jnp.where(here_GSA, offset + experts_GSA * size + row_GSA - first, dest_GSA)
    first, offset = first + size, offset + E * size
  dest_XA = jnp.where(kept_GSA, dest_GSA, N).reshape(X, A)
  asg_N = _assignment_of_row(dest_XA, N)
  starts = [E * sum(blocks[:i]) for i in range(len(blocks) + 1)]
  asgs = tuple(asg_N[lo:hi] for lo, hi in zip(starts[:-1], starts[1:]))
  return dest_XA, asgs, jnp.max(jnp.sum(count_GE, axis=0))


def gather_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                    matmul: str = 'xla'):
  """Same kept set as einsum (capacity_slots), but rows are gathered, not multiplied by one-hot tensors. On one
  CPU device with a tile's rows an expert (`row_tiles_pay`) the kept rows are packed by expert and run as
  `grouped_ffn`'s row tiles (`packed_rows_dispatch`)."""
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  if row_tiles_pay(X * A // E):
    return packed_rows_dispatch(x_GSD, gates_GSA, experts_GSA, w, capacity, activation, matmul)
  blocks = expert_blocks(G * capacity, -(-X * A // E))
  slot_GSA, kept_GSA, count_GE = slots_and_counts(experts_GSA, E, capacity)
  dest_XA, asgs, n_rows = expert_rows(experts_GSA, slot_GSA, kept_GSA, count_GE, tuple(b for b, _ in blocks))
  xs = dispatch_rows(x_GSD.reshape(X, D), tuple(asg_N // A for asg_N in asgs), dest_XA)
  ys, first = [], 0
  for x_ND, (size, buckets) in zip(xs, blocks):
    x_EMD = constrain(x_ND.reshape(E, size, D), ('expert', None, 'embed'))  # expert parallel: all-to-all
    y_EMD = expert_ffn_rows(x_EMD, w, n_rows - first, activation, buckets)
    ys.append(y_EMD.reshape(E * size, D))
    first += size
  weight_XA = (gates_GSA * kept_GSA).reshape(X, A).astype(x_GSD.dtype)
  return combine_rows(tuple(ys), weight_XA, dest_XA, asgs).reshape(G, S, D), kept_GSA


def packed_rows_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                         matmul: str = 'xla'):
  """`gather_dispatch` on one CPU device: the same kept set, the kept rows packed by expert (group by group, slot
  by slot) into one run per expert, and `grouped_ffn`'s row tiles over the runs: each expert computes the rows it
  kept, not the busiest expert's bucket, and the tiles' 2-D GEMMs beat batched products on CPU."""
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  N = X * A + GROUP_TILE  # every assignment kept, and the slack grouped_ffn's last tile may run into
  slot_GSA, kept_GSA, count_GE = slots_and_counts(experts_GSA, E, capacity)
  sizes_E = jnp.sum(count_GE, axis=0)
  run_start_E = jnp.cumsum(sizes_E) - sizes_E
  dest_XA = jnp.where(kept_GSA, run_start_E[experts_GSA] + _row_in_expert(experts_GSA, slot_GSA, count_GE),
                      N).reshape(X, A)
  asg_N = _assignment_of_row(dest_XA, N)
  y_ND = rows_ffn(x_GSD.reshape(X, D), asg_N // A, dest_XA, w, sizes_E, activation, matmul=matmul)
  weight_XA = (gates_GSA * kept_GSA).reshape(X, A).astype(x_GSD.dtype)
  return combine_rows((y_ND,), weight_XA, dest_XA, (asg_N,)).reshape(G, S, D), kept_GSA
