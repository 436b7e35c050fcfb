"""Dropless grouped matmuls in row tiles: what `jax.lax.ragged_dot` does, without its dense lowering on CPU.

Shape letters: slmjax/shapes.py (here X source rows, A, E, D, F, N rows sorted by expert plus slack, W rows of
one tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import slmjax.dispatch.fused_swiglu as fused_swiglu
from slmjax.dispatch.bits import as_bits, from_bits, index_in_dim
from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.rows import sum_rows, take_rows
from slmjax.kernels.gemm import dot, on_one_cpu_device
from slmjax.layers import activate

GROUP_TILES = (1024, 512, 256, 128)  # grouped_ffn's tile sizes, largest first; the last is the slack it needs
GROUP_TILE = GROUP_TILES[-1]
# From this many elements of [N, D] on, the backward writes dx over dy in place instead of into a zeroed buffer:
# zero-filling a large buffer costs more than a select a tile (E=64, k=8, 4096 x 256 tokens: 0.87-0.95x the layer
# step); below it the select costs more (d_model 32-64 rungs: 1.01-1.10x). Measured, interleaved A/B.
IN_PLACE_MIN_ELEMENTS = 2 ** 21


def _pick(w: ExpertWeights, e) -> ExpertWeights:
  """Expert e's weights, sliced on their bits (slmjax/dispatch/bits.py)."""
  return ExpertWeights(*(None if a is None else index_in_dim(a, e) for a in w))


def _tile_plan(sizes_E: jax.Array, rows: int, tiles: tuple[int, ...]):
  """Per expert, for rows sorted by expert: its run's first row, and how many tiles of each size cover the run
  in ceil(size / tiles[-1]) units of the smallest tile, largest tiles first (so at most one partial unit, in the
  last tile, which may run past the run's end). A size no run can use (over rows - tiles[-1]) is left out: a
  loop that never runs would still cost, as XLA hoists its window, as wide as the whole buffer, out of it."""
  unit = tiles[-1]
  sizes = tuple(t for t in tiles[:-1] if t <= rows - unit) + (unit,)
  left_E, counts = -(-sizes_E // unit), []
  for size in sizes:
    counts.append(left_E // (size // unit))
    left_E = left_E - counts[-1] * (size // unit)
  return jnp.cumsum(sizes_E) - sizes_E, tuple(zip(sizes, counts))


def _write_at(buf: jax.Array, update: jax.Array, start, dtype) -> jax.Array:
  """buf (`as_bits` of a `dtype` array) with `update` written at index `start` of axis 0, in place."""
  return jax.lax.dynamic_update_slice_in_dim(buf, as_bits(update.astype(dtype)), start, 0)


def _over_tiles(e, plan, tile_step, carry):
  """carry = tile_step(tile rows, first row, carry) over expert e's tiles, in row order."""
  start_E, levels = plan
  row = start_E[e]
  for size, count_E in levels:
    carry = jax.lax.fori_loop(0, count_E[e], lambda j, c, s=size, f=row: tile_step(s, f + j * s, c), carry)
    row = row + count_E[e] * size
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def grouped_ffn(x_XD: jax.Array, row_src_N: jax.Array, dest_XA: jax.Array, w: ExpertWeights, sizes_E: jax.Array,
                activation: str, tiles: tuple[int, ...] = GROUP_TILES, matmul: str = 'xla'):
  """Expert e's FFN on its run of rows, for rows sorted by expert (sizes_E rows each): dropless grouped matmuls,
  what `jax.lax.ragged_dot` does, which on CPU lowers to a dense masked product (E times the FLOPs). Here a loop
  over experts, each slicing its weights once, and within it loops over tiles: the run is cut into units of the
  smallest tile (the last one partial) and the units are covered by as few tiles as `tiles` allows, largest
  first: wide matmuls run faster (on 2 cores a 512-row matmul does 1.8x the FLOP/s of a 128-row one), and a run
  of 510 rows takes one 512-row tile, not four of 128. The work is the rows plus at most one partial unit per
  expert, however unbalanced the experts are. Tiles are written in row order, so a tile's rows past its
  expert's run are overwritten by the next expert's tiles.

  Row n is x_XD[row_src_N[n]], gathered by the tile that reads it: the [N, D] rows are never built (one pass
  over N x D less, and no such residual kept for the backward: 0.90-0.97x the E=64, k=8 layer). row_src_N holds
  the sorted rows and then at least `tiles[-1]` rows of slack (N >= sum(sizes_E) + tiles[-1]), where the last
  tile may run; an index >= X (an empty row) reads an arbitrary row. Slack rows' outputs are arbitrary and
  their cotangents ignored. dest_XA is the inverse map (the rows each source row feeds, >= N for none): the
  backward sums the rows' cotangents into dx_XD with gathers, as `dispatch_rows` does.

  `matmul` (ModelConfig.matmul) runs the tiles' products in a vendor GEMM (slmjax/kernels/gemm.py): the weight
  gradients x^T dy, a transposed operand, are where XLA's dot is slowest.
  """
  return _grouped_fwd(x_XD, row_src_N, dest_XA, w, sizes_E, activation, tiles, matmul)[0]


def _source_rows(x_XD, row_src_N, row, size):
  """Rows [row, row + size) of the sorted layout, gathered from their source rows (past the end: clipped)."""
  return take_rows(x_XD, jax.lax.dynamic_slice_in_dim(row_src_N, row, size))


def _grouped_fwd(x_XD, row_src_N, dest_XA, w, sizes_E, activation, tiles, matmul):
  N, D = row_src_N.shape[0], x_XD.shape[1]
  plan = _tile_plan(sizes_E, N, tiles)
  dot_ = functools.partial(dot, library=matmul)

  def expert(e, carry):
    we = _pick(w, e)

    def tile_step(size, row, carry):
      y_ND, gate_NF, up_NF = carry
      x_WD = _source_rows(x_XD, row_src_N, row, size)
      up_WF = dot_(x_WD, we.w_up_EDF)
      gate_WF = None if we.w_gate_EDF is None else dot_(x_WD, we.w_gate_EDF)
      y_WD = dot_(activate(gate_WF, up_WF, activation), we.w_down_EFD)
      write = lambda buf, rows: None if buf is None else _write_at(buf, rows, row, x_XD.dtype)
      return write(y_ND, y_WD), write(gate_NF, gate_WF), write(up_NF, up_WF)
    return _over_tiles(e, plan, tile_step, carry)

  # Pre-activations are the residuals (the backward recomputes only the cheap activation); gate and up in
  # buffers of their own, as a concatenated [tile, 2F] write costs a copy per tile.
  # Zeros made like an operand (full_like keeps its shard_map varying axes, which a loop carry must match).
  zeros_NF = lambda F: jax.lax.full_like(x_XD, 0, shape=(N, F))
  init = tuple(None if a is None else as_bits(zeros_NF(a.shape[-1])) for a in (x_XD, w.w_gate_EDF, w.w_up_EDF))
  out = jax.lax.fori_loop(0, w.w_up_EDF.shape[0], expert, init)
  y_ND, gate_NF, up_NF = out  # the residuals stay bits: the backward's tiles slice them
  return from_bits(y_ND, x_XD.dtype), (x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF)


def _grouped_bwd(activation, tiles, matmul, res, dy_ND):
  x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF = res
  dtype = x_XD.dtype
  plan = _tile_plan(sizes_E, dy_ND.shape[0], tiles)
  end_E = plan[0] + sizes_E
  dot_ = functools.partial(dot, library=matmul)
  in_place = dy_ND.size >= IN_PLACE_MIN_ELEMENTS

  def expert(e, carry):
    dx_ND, dw = carry
    we = _pick(w, e)

    def tile_step(size, row, carry):
      dx_ND, dwe = carry
      rows = lambda buf: None if buf is None else jax.lax.dynamic_slice_in_dim(buf, row, size)
      valid_W1 = (jnp.arange(size) < end_E[e] - row)[:, None]  # later rows: the next expert's or slack
      # In place, dx_ND holds dy in the rows no tile has written yet (this tile's included).
      dy_in_WD = from_bits(rows(dx_ND if in_place else as_bits(dy_ND)), dtype)
      x_WD, dy_WD = _source_rows(x_XD, row_src_N, row, size), jnp.where(valid_W1, dy_in_WD, 0)
      # The activation's backward in f32, from dy w_down^T's f32 result: in bf16 it would round that product to
      # bf16 only for XLA to compute in f32 again; its results are rounded once, as GEMM operands.
      f32_rows = lambda buf: None if buf is None else from_bits(rows(buf), dtype).astype(jnp.float32)
      h_WF, act_vjp = jax.vjp(lambda g, u: activate(g, u, activation), f32_rows(gate_NF), f32_rows(up_NF))
      dgate_WF, dup_WF = (None if a is None else a.astype(dtype)
                          for a in act_vjp(dot_(dy_WD, we.w_down_EFD, transb=True, f32=True)))
      h_WF = h_WF.astype(dtype)
      dx_WD = dot_(dup_WF, we.w_up_EDF, transb=True, f32=True)
      if dgate_WF is not None:
        dx_WD = dx_WD + dot_(dgate_WF, we.w_gate_EDF, transb=True, f32=True)
      grads = (None if dgate_WF is None else dot_(x_WD, dgate_WF, transa=True, f32=True),
               dot_(x_WD, dup_WF, transa=True, f32=True), dot_(h_WF, dy_WD, transa=True, f32=True))
      dwe = ExpertWeights(*(None if a is None else a + g for a, g in zip(dwe, grads)))
      if in_place:  # rows past the run keep their dy, which the next expert's tiles read
        dx_WD = jnp.where(valid_W1, dx_WD, dy_in_WD)
      return _write_at(dx_ND, dx_WD, row, dtype), dwe

    # Expert e's weight gradients accumulate in an f32 [D, F] carry (one rounding to bf16, not one a tile) and
    # are written once, not added per tile.
    zeros = ExpertWeights(*(None if a is None else jax.lax.full_like(a, 0, jnp.float32, a.shape[1:]) for a in w))
    dx_ND, dwe = _over_tiles(e, plan, tile_step, (dx_ND, zeros))
    dw = ExpertWeights(*(None if a is None else _write_at(a, g[None], e, wa.dtype)
                         for a, g, wa in zip(dw, dwe, w)))
    return dx_ND, dw

  zeros = ExpertWeights(*(None if a is None else as_bits(jnp.zeros_like(a)) for a in w))
  dx_init_ND = dy_ND if in_place else jnp.zeros_like(dy_ND)
  dx_ND, dw = jax.lax.fori_loop(0, w.w_up_EDF.shape[0], expert, (as_bits(dx_init_ND), zeros))
  dw = ExpertWeights(*(None if a is None else from_bits(a, wa.dtype) for a, wa in zip(dw, w)))
  return sum_rows((from_bits(dx_ND, dtype),), dest_XA), None, None, dw, None


grouped_ffn.defvjp(_grouped_fwd, _grouped_bwd)


def rows_ffn(x_XD: jax.Array, row_src_N: jax.Array, dest_XA: jax.Array, w: ExpertWeights, sizes_E: jax.Array,
             activation: str, matmul: str = 'xla'):
  """`grouped_ffn` (its arguments and result; the weights cast to x's dtype), or where it takes the layer the
  fused SwiGLU call on the weights as given (slmjax/dispatch/fused_swiglu.py: narrow experts on one CPU device,
  `matmul` 'auto')."""
  if fused_swiglu.runs(x_XD, w, activation, matmul):
    return fused_swiglu.swiglu_ffn(x_XD, row_src_N, dest_XA, w, sizes_E)
  return grouped_ffn(x_XD, row_src_N, dest_XA, w.cast(x_XD.dtype), sizes_E, activation, matmul=matmul)


def row_tiles_pay(rows_per_expert: int) -> bool:
  """Whether einsum and gather run their experts as these row tiles rather than batched products: on one CPU
  device (no mesh, or a mesh of one device), once an expert's rows (on average) fill the smallest tile. On a
  mesh XLA partitions the batched products over the expert axis, where the tiles' loop over experts would gather
  every expert's rows to every device; below a tile an expert (decode's few tokens, `select`'s fallback) the
  batched products over small buffers are faster than a tile per expert."""
  return on_one_cpu_device() and rows_per_expert >= GROUP_TILE


def equal_runs_ffn(x_EMD: jax.Array, w: ExpertWeights, activation: str, matmul: str = 'xla') -> jax.Array:
  """Expert e's FFN on every row of its buffer x_EMD[e] (what `expert_ffn` does with batched products), as
  `grouped_ffn`'s 2-D row tiles: on CPU 0.91x the batched products at E=8, d_expert 512 (1,280 rows an expert,
  forward + backward), 0.98x at E=64, d_expert 64 (interleaved A/B)."""
  E, M, D = x_EMD.shape
  N = E * M
  row_src_N = jnp.concatenate([jnp.arange(N, dtype=jnp.int32), jnp.full((GROUP_TILE,), N, jnp.int32)])
  dest_N1 = jnp.arange(N, dtype=jnp.int32)[:, None]
  sizes_E = jnp.full((E,), M, jnp.int32)
  y_ND = rows_ffn(x_EMD.reshape(N, D), row_src_N, dest_N1, w, sizes_E, activation, matmul=matmul)
  return y_ND[:N].reshape(E, M, D)
