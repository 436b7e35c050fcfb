"""Token-to-expert dispatch implementations behind one interface.

Every implementation has the signature
  dispatch(x_GSD, gates_GSA, experts_GSA, weights, capacity, activation) -> (y_GSD, kept_GSA)
where tokens come split into G groups of S tokens, each token has A = top_k (expert index, gate) pairs, `capacity`
is C, the slots per expert per group, and `kept_GSA` says which assignments were computed (not dropped for lack
of capacity). A token whose assignments are all dropped gets a zero output: the residual carries it through.

Capacity priority (shared by every dropping implementation): token order. Token t's assignments take their slots
after those of every earlier token in its group, so whether t is dropped depends only on tokens up to t: the
model stays causal even when tokens drop (groups are contiguous runs of the flattened batch x time tokens). GShard
and Switch place every first choice before any second choice instead, which protects first choices but lets a
later token's first choice evict an earlier token's second: information from the future, for a language model.

  einsum  the GShard reference: one-hot dispatch / combine tensors [G,S,E,C] contracted with einsums; their cost
          grows with S * E * C per group, so small groups are fast (and drop more).
  gather  drops exactly what einsum drops; token rows are gathered into per-expert buffers (M = G * C rows per
          expert, in a base block of the balanced load and a tail block), the tail's matmuls run only on the rows
          the busiest expert uses (rounded up to a static bucket), and every token gathers its k output rows
          back. Forward and backward are gathers only: no scatter-add, no [G,S,E,C] tensor.
  ragged  dropless: assignments sorted by expert, grouped matmuls with `jax.lax.ragged_dot`; `capacity` ignored.
  dense   every expert on every token, mixed by the gates: the correctness oracle (E / k times the FLOPs).

Dimension letters: G groups, S tokens per group, A assignments per token (top_k), E experts, C capacity,
D d_model, F expert width, H = 2F (gate and up side by side), X tokens (G * S), M rows of one expert's buffer
(B of one block), N any flattened row axis.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from slmjax.layers import activate
from slmjax.sharding import constrain


class ExpertWeights(NamedTuple):
  """Stacked weights of E experts; `w_gate_EDF` is None for the ungated GELU FFN."""
  w_gate_EDF: jax.Array | None
  w_up_EDF: jax.Array
  w_down_EFD: jax.Array


def expert_ffn(x_EXD: jax.Array, w: ExpertWeights, activation: str) -> jax.Array:
  """Run expert e's FFN on the tokens x_EXD[e], for all experts at once (batched matmuls)."""
  up_EXF = jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_up_EDF)
  gate_EXF = None if w.w_gate_EDF is None else jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_gate_EDF)
  return jnp.einsum('EXF,EFD->EXD', activate(gate_EXF, up_EXF, activation), w.w_down_EFD)


def capacity_slots(experts_GSA: jax.Array, n_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Slot of each assignment inside its expert's buffer, and whether it fits (slot < capacity).

  Token-major priority: token 0's k assignments, then token 1's, and so on (causal; see the module docstring).
  """
  slot_GSA, kept_GSA, _ = _slots_and_counts(experts_GSA, n_experts, capacity)
  return slot_GSA, kept_GSA


def _slots_and_counts(experts_GSA, n_experts, capacity):
  """capacity_slots plus count_GE, the kept assignments per group and expert. The running count is an
  associative scan: on CPU 4x faster than jnp.cumsum (a reduce-window) at E=64."""
  G, S, A = experts_GSA.shape
  mask_GNE = jax.nn.one_hot(experts_GSA.reshape(G, S * A), n_experts, dtype=jnp.int32)
  count_GNE = jax.lax.associative_scan(jnp.add, mask_GNE, axis=1)  # assignments to e up to and including n
  slot_GSA = (jnp.sum(count_GNE * mask_GNE, axis=-1) - 1).reshape(G, S, A)
  return slot_GSA, slot_GSA < capacity, jnp.minimum(count_GNE[:, -1], capacity)


# ----------------------------------------------------------------------------------------------- einsum, dense
def einsum_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """GShard-style dispatch (Lepikhin et al. 2020): a one-hot tensor [G,S,E,C] moves tokens into expert slots and,
  transposed, back. The gates scale the expert outputs in slot space, so dispatch and combine contract the same
  0/1 tensor and the gate gradient is a sum over D, not a fifth [G,S,E,C] x D contraction (4% faster on CPU)."""
  E, dt = w.w_up_EDF.shape[0], x_GSD.dtype
  G, S, D = x_GSD.shape
  slot_GSA, kept_GSA = capacity_slots(experts_GSA, E, capacity)
  expert_GSAE = jax.nn.one_hot(jnp.where(kept_GSA, experts_GSA, E), E, dtype=dt)  # dropped: all-zero row
  slot_GSAC = jax.nn.one_hot(slot_GSA, capacity, dtype=dt)
  dispatch_GSEC = jnp.einsum('GSAE,GSAC->GSEC', expert_GSAE, slot_GSAC)
  gate_EGC = jnp.einsum('GSEC,GSAE,GSA->EGC', dispatch_GSEC, expert_GSAE, gates_GSA.astype(dt))
  x_GSD = constrain(x_GSD, ('batch', None, 'embed'))
  x_EGCD = constrain(jnp.einsum('GSEC,GSD->EGCD', dispatch_GSEC, x_GSD), ('expert', 'group', None, 'embed'))
  M = G * capacity
  y_EMD = expert_ffn_rows(x_EGCD.reshape(E, M, D), w, jnp.int32(M), activation, (M,))
  y_EGCD = y_EMD.reshape(E, G, capacity, D) * gate_EGC[..., None]
  return jnp.einsum('GSEC,EGCD->GSD', dispatch_GSEC, y_EGCD), kept_GSA


def dense_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Correctness oracle: every expert runs on every token, outputs mixed by the gates; never drops."""
  del capacity
  E = w.w_up_EDF.shape[0]
  G, S, D = x_GSD.shape
  y_EXD = expert_ffn(jnp.broadcast_to(x_GSD.reshape(1, G * S, D), (E, G * S, D)), w, activation)
  weight_GSE = jnp.einsum('GSAE,GSA->GSE', jax.nn.one_hot(experts_GSA, E, dtype=x_GSD.dtype),
                          gates_GSA.astype(x_GSD.dtype))
  y_GSD = jnp.einsum('GSE,EGSD->GSD', weight_GSE, y_EXD.reshape(E, G, S, D))
  return y_GSD, jnp.ones(experts_GSA.shape, dtype=bool)


# ------------------------------------------------------------------------------------- row gathers (no scatter)
# A row buffer may come in segments (a tuple of [N_i, D] arrays, indexed as if concatenated) so that the expert
# blocks of different shapes in `gather_dispatch` never need a concatenate or a slice (each one a full copy).
def _take_rows(src_ND: jax.Array, idx: jax.Array) -> jax.Array:
  """src_ND[idx] with out-of-range indices clamped: one gather pass (mode='fill' adds a select pass over the
  whole output); callers mask the rows an out-of-range 'empty' index reads."""
  return jnp.take(src_ND, idx, axis=0, mode='clip')


def _take_segments(segments, idx_X: jax.Array) -> jax.Array:
  """Rows idx of the segments' concatenation (out-of-range indices read an arbitrary row)."""
  rows_XD, offset = None, 0
  for seg_ND in segments:
    here_XD = _take_rows(seg_ND, idx_X - offset)
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
  return tuple(_take_rows(x_XD, token_N) for token_N in tokens)


def _dispatch_rows_fwd(x_XD, tokens, dest_XA):
  return dispatch_rows(x_XD, tokens, dest_XA), dest_XA


def _dispatch_rows_bwd(dest_XA, dbufs):
  N = _rows(dbufs)
  dx_XD = sum(jnp.where((dest_XA[:, a] < N)[:, None], _take_segments(dbufs, dest_XA[:, a]), 0)
              for a in range(dest_XA.shape[1]))
  return dx_XD, (None,) * len(dbufs), None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def combine_rows(ys: tuple[jax.Array, ...], weight_XA: jax.Array, dest_XA: jax.Array,
                 asgs: tuple[jax.Array, ...]) -> jax.Array:
  """y[t] = sum_a weight[t, a] * buf[dest[t, a]] over the concatenated buffer segments `ys`, zero where dest is
  past the end (dropped). `asgs` is the inverse map (flat assignment t * A + a held by each row of each segment,
  X * A if empty), so the backward gathers instead of scatter-adding into the buffer."""
  N = _rows(ys)
  return sum(jnp.where((dest_XA[:, a] < N)[:, None], _take_segments(ys, dest_XA[:, a]) * weight_XA[:, a, None], 0)
             for a in range(dest_XA.shape[1]))


def _combine_rows_fwd(ys, weight_XA, dest_XA, asgs):
  return combine_rows(ys, weight_XA, dest_XA, asgs), (ys, weight_XA, dest_XA, asgs)


def _combine_rows_bwd(res, dy_XD):
  ys, weight_XA, dest_XA, asgs = res
  X, A = dest_XA.shape
  weight_N = weight_XA.reshape(-1)
  dys = tuple(_take_rows(dy_XD, asg_N // A) * jnp.where(asg_N < X * A, _take_rows(weight_N, asg_N), 0)[:, None]
              for asg_N in asgs)
  dweight_XA = jnp.stack([jnp.sum(_take_segments(ys, dest_XA[:, a]) * dy_XD, axis=-1) for a in range(A)], axis=1)
  return dys, jnp.where(dest_XA < _rows(ys), dweight_XA, 0), None, (None,) * len(asgs)


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# ---------------------------------------------------------------------------- expert FFN on a data-dependent prefix
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


FUSE_GATE_UP_MAX_F = 128  # fine-grained experts: one [D, 2F] matmul beats two narrow [D, F] ones (measured)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def expert_ffn_rows(x_EMD, w: ExpertWeights, n_rows, activation: str, buckets: tuple[int, ...]):
  """expert_ffn(x_EMD, w) on rows [0, n_rows) of every expert; later rows are don't-care (their output is
  arbitrary, their cotangent must be zero). The matmuls, forward and backward, run on the smallest static bucket
  >= n_rows rows. Residuals are the pre-activations, so the backward recomputes only the cheap activation."""
  return _ffn_rows_fwd(x_EMD, w, n_rows, activation, buckets)[0]


def _pad_rows(a_EXF, rows):
  return None if a_EXF is None else jnp.pad(a_EXF, ((0, 0), (0, rows - a_EXF.shape[1]), (0, 0)))


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
  """(gate, up) from the saved pre-activations: (gu_EXH,) when fused, else (gate_EXF or None, up_EXF)."""
  return (pre[0][..., :F], pre[0][..., F:]) if len(pre) == 1 else pre


def _ffn_rows_fwd(x_EMD, w, n_rows, activation, buckets):
  def branch(rows, x_EMD, w, w_gu_EDH):
    x_EXD, M = x_EMD[:, :rows], x_EMD.shape[1]
    if w_gu_EDH is not None:
      pre = (jnp.einsum('EXD,EDH->EXH', x_EXD, w_gu_EDH),)
    else:
      pre = (None if w.w_gate_EDF is None else jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_gate_EDF),
             jnp.einsum('EXD,EDF->EXF', x_EXD, w.w_up_EDF))
    h_EXF = activate(*_gate_up(pre, w.w_up_EDF.shape[-1]), activation)
    y_EXD = jnp.einsum('EXF,EFD->EXD', h_EXF, w.w_down_EFD)
    return _pad_rows(y_EXD, M), tuple(_pad_rows(p, M) for p in pre)
  w_gu_EDH = _fused(w)
  y_EMD, pre = _switch(n_rows, buckets, branch, x_EMD, w, w_gu_EDH)
  return y_EMD, (x_EMD, w, w_gu_EDH, n_rows, pre)


def _ffn_rows_bwd(activation, buckets, res, dy_EMD):
  def branch(rows, x_EMD, w, w_gu_EDH, pre, dy_EMD):
    M, F = x_EMD.shape[1], w.w_up_EDF.shape[-1]
    x_EXD, dy_EXD = x_EMD[:, :rows], dy_EMD[:, :rows]
    gate_EXF, up_EXF = _gate_up(tuple(None if p is None else p[:, :rows] for p in pre), F)
    h_EXF, act_vjp = jax.vjp(lambda g, u: activate(g, u, activation), gate_EXF, up_EXF)
    dgate_EXF, dup_EXF = act_vjp(jnp.einsum('EXD,EFD->EXF', dy_EXD, w.w_down_EFD))
    dw_down_EFD = jnp.einsum('EXF,EXD->EFD', h_EXF, dy_EXD)
    if w_gu_EDH is not None:
      dgu_EXH = jnp.concatenate([dgate_EXF, dup_EXF], axis=-1)
      dx_EXD = jnp.einsum('EXH,EDH->EXD', dgu_EXH, w_gu_EDH)
      dw_gu_EDH = jnp.einsum('EXD,EXH->EDH', x_EXD, dgu_EXH)
      return _pad_rows(dx_EXD, M), ExpertWeights(dw_gu_EDH[..., :F], dw_gu_EDH[..., F:], dw_down_EFD)
    dx_EXD = jnp.einsum('EXF,EDF->EXD', dup_EXF, w.w_up_EDF)
    dw_gate_EDF = None
    if gate_EXF is not None:
      dx_EXD = dx_EXD + jnp.einsum('EXF,EDF->EXD', dgate_EXF, w.w_gate_EDF)
      dw_gate_EDF = jnp.einsum('EXD,EXF->EDF', x_EXD, dgate_EXF)
    dw = ExpertWeights(dw_gate_EDF, jnp.einsum('EXD,EXF->EDF', x_EXD, dup_EXF), dw_down_EFD)
    return _pad_rows(dx_EXD, M), dw
  x_EMD, w, w_gu_EDH, n_rows, pre = res
  dx_EMD, dw = _switch(n_rows, buckets, branch, x_EMD, w, w_gu_EDH, pre, dy_EMD)
  return dx_EMD, dw, None


expert_ffn_rows.defvjp(_ffn_rows_fwd, _ffn_rows_bwd)


# ---------------------------------------------------------------------------------- grouped FFN in row tiles (CPU)
GROUP_TILE = 128  # rows of grouped_ffn's remainder tiles (as uniform tiles: 3% faster than 256, 512 25% slower)
GROUP_BULK = 512  # rows of its bulk tiles, whole inside an expert's run: the MoE layer 3-4% faster at d_expert 512


def _pick(w: ExpertWeights, e) -> ExpertWeights:
  return ExpertWeights(*(None if a is None else jax.lax.dynamic_index_in_dim(a, e, keepdims=False) for a in w))


def _tile_plan(sizes_E: jax.Array, rows: int, tile: int, bulk: int):
  """Per expert, for rows sorted by expert: its run's first row, its number of `bulk`-row tiles, and of
  `tile`-row tiles covering the rest (the last one may run past the run's end); and `bulk`, 0 when no run can
  hold a bulk tile (the runs fill at most rows - tile rows): a bulk loop that never runs would still cost, as
  XLA hoists its window, as wide as the whole buffer, out of the loop."""
  bulk = bulk if bulk <= rows - tile else 0
  bulk_E = sizes_E // bulk if bulk else jnp.zeros_like(sizes_E)
  return jnp.cumsum(sizes_E) - sizes_E, bulk_E, -(-(sizes_E - bulk_E * bulk) // tile), bulk


def _over_tiles(e, plan, tile: int, tile_step, carry):
  """carry = tile_step(rows, first_row, carry) over expert e's bulk tiles, then its remainder tiles."""
  start_E, bulk_E, rest_E, bulk = plan
  if bulk:
    carry = jax.lax.fori_loop(0, bulk_E[e], lambda j, c: tile_step(bulk, start_E[e] + j * bulk, c), carry)
  first = start_E[e] + bulk_E[e] * bulk
  return jax.lax.fori_loop(0, rest_E[e], lambda j, c: tile_step(tile, first + j * tile, c), carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def grouped_ffn(x_PD: jax.Array, w: ExpertWeights, sizes_E: jax.Array, activation: str, tile: int = GROUP_TILE,
                bulk: int = GROUP_BULK):
  """Expert e's FFN on its run of rows, for rows sorted by expert (sizes_E rows each): dropless grouped matmuls,
  what `jax.lax.ragged_dot` does, which on CPU lowers to a dense masked product (E times the FLOPs). Here a loop
  over experts, each slicing its weights once, and within it loops over tiles: `bulk`-row tiles while they fit
  in the expert's run (wide matmuls run faster), then `tile`-row tiles, the last one partial. The work is the
  rows plus at most one partial tile per expert, however unbalanced the experts are. Tiles are written in row
  order, so a tile's rows past its expert's run are overwritten by the next expert's tiles.

  x_PD holds the sorted rows and then at least `tile` rows of slack (P >= sum(sizes_E) + tile), where the last
  tile may run: the caller builds the slack in its own gather, which is cheaper than padding here (a copy of
  every row, forward and backward). Slack rows' outputs are arbitrary and their cotangents ignored.
  """
  return _grouped_fwd(x_PD, w, sizes_E, activation, tile, bulk)[0]


def _grouped_fwd(x_PD, w, sizes_E, activation, tile, bulk):
  P, D = x_PD.shape
  plan = _tile_plan(sizes_E, P, tile, bulk)

  def expert(e, carry):
    we = _pick(w, e)

    def tile_step(size, row, carry):
      y_PD, gate_PF, up_PF = carry
      x_WD = jax.lax.dynamic_slice_in_dim(x_PD, row, size)
      up_WF = x_WD @ we.w_up_EDF
      gate_WF = None if we.w_gate_EDF is None else x_WD @ we.w_gate_EDF
      y_WD = activate(gate_WF, up_WF, activation) @ we.w_down_EFD
      write = lambda buf, rows: None if buf is None else jax.lax.dynamic_update_slice_in_dim(buf, rows, row, 0)
      return write(y_PD, y_WD), write(gate_PF, gate_WF), write(up_PF, up_WF)
    return _over_tiles(e, plan, tile, tile_step, carry)

  # Pre-activations are the residuals (the backward recomputes only the cheap activation); gate and up in
  # buffers of their own, as a concatenated [tile, 2F] write costs a copy per tile.
  zeros_PF = lambda a: None if a is None else jnp.zeros((P, a.shape[-1]), x_PD.dtype)
  init = (jnp.zeros((P, D), x_PD.dtype), zeros_PF(w.w_gate_EDF), zeros_PF(w.w_up_EDF))
  y_PD, gate_PF, up_PF = jax.lax.fori_loop(0, w.w_up_EDF.shape[0], expert, init)
  return y_PD, (x_PD, w, sizes_E, gate_PF, up_PF)


def _grouped_bwd(activation, tile, bulk, res, dy_PD):
  x_PD, w, sizes_E, gate_PF, up_PF = res
  plan = _tile_plan(sizes_E, x_PD.shape[0], tile, bulk)
  end_E = plan[0] + sizes_E

  def expert(e, carry):
    dx_PD, dw = carry
    we = _pick(w, e)

    def tile_step(size, row, carry):
      dx_PD, dwe = carry
      rows = lambda buf: None if buf is None else jax.lax.dynamic_slice_in_dim(buf, row, size)
      valid_W1 = (jnp.arange(size) < end_E[e] - row)[:, None]  # later rows: the next expert's or slack
      x_WD, dy_WD = rows(x_PD), jnp.where(valid_W1, rows(dy_PD), 0)
      h_WF, act_vjp = jax.vjp(lambda g, u: activate(g, u, activation), rows(gate_PF), rows(up_PF))
      dgate_WF, dup_WF = act_vjp(dy_WD @ we.w_down_EFD.T)
      dx_WD = dup_WF @ we.w_up_EDF.T
      if dgate_WF is not None:
        dx_WD = dx_WD + dgate_WF @ we.w_gate_EDF.T
      grads = (None if dgate_WF is None else x_WD.T @ dgate_WF, x_WD.T @ dup_WF, h_WF.T @ dy_WD)
      dwe = ExpertWeights(*(None if a is None else a + g for a, g in zip(dwe, grads)))
      return jax.lax.dynamic_update_slice_in_dim(dx_PD, dx_WD, row, 0), dwe

    # Expert e's weight gradients accumulate in a [D, F] carry and are written once, not added per tile.
    zeros = ExpertWeights(*(None if a is None else jnp.zeros(a.shape[1:], a.dtype) for a in w))
    dx_PD, dwe = _over_tiles(e, plan, tile, tile_step, (dx_PD, zeros))
    dw = ExpertWeights(*(None if a is None else jax.lax.dynamic_update_index_in_dim(a, g, e, 0)
                         for a, g in zip(dw, dwe)))
    return dx_PD, dw

  zeros = ExpertWeights(*(None if a is None else jnp.zeros_like(a) for a in w))
  dx_PD, dw = jax.lax.fori_loop(0, w.w_up_EDF.shape[0], expert, (jnp.zeros_like(x_PD), zeros))
  return dx_PD, dw, None


grouped_ffn.defvjp(_grouped_fwd, _grouped_bwd)


# ------------------------------------------------------------------------------------------------ gather, ragged
def expert_rows(experts_GSA, slot_GSA, kept_GSA, count_GE, blocks: tuple[int, ...]):
  """Where each kept assignment goes in the per-expert buffer: row r of expert e (experts' rows packed from the
  front across groups: group g's rows follow those of groups < g) lives in the block holding r; blocks are laid
  out one after the other, each as [E, block rows].

  Returns dest_XA (buffer row, past the end if dropped), asgs (per block: the flat assignment t * A + a in each
  row, X * A if empty) and n_rows (rows the busiest expert uses).
  """
  G, S, A = experts_GSA.shape
  E, N, X = count_GE.shape[1], count_GE.shape[1] * sum(blocks), G * S
  start_GE = jnp.cumsum(count_GE, axis=0) - count_GE
  row_GSA = jnp.take_along_axis(start_GE, experts_GSA.reshape(G, S * A), axis=1).reshape(G, S, A) + slot_GSA
  dest_GSA, first, offset = jnp.full(experts_GSA.shape, N, jnp.int32), 0, 0
  for size in blocks:
    here_GSA = (row_GSA >= first) & (row_GSA < first + size)
    dest_GSA = jnp.where(here_GSA, offset + experts_GSA * size + row_GSA - first, dest_GSA)
    first, offset = first + size, offset + E * size
  dest_XA = jnp.where(kept_GSA, dest_GSA, N).reshape(X, A)
  asg_N = jnp.full((N,), X * A, jnp.int32).at[dest_XA.reshape(-1)].set(jnp.arange(X * A, dtype=jnp.int32),
                                                                         mode='drop')
  starts = [E * sum(blocks[:i]) for i in range(len(blocks) + 1)]
  asgs = tuple(asg_N[lo:hi] for lo, hi in zip(starts[:-1], starts[1:]))
  return dest_XA, asgs, jnp.max(jnp.sum(count_GE, axis=0))


def gather_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Same kept set as einsum (capacity_slots), but rows are gathered, not multiplied by one-hot tensors."""
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  blocks = expert_blocks(G * capacity, -(-X * A // E))
  slot_GSA, kept_GSA, count_GE = _slots_and_counts(experts_GSA, E, capacity)
  dest_XA, asgs, n_rows = expert_rows(experts_GSA, slot_GSA, kept_GSA, count_GE, tuple(b for b, _ in blocks))
  xs = dispatch_rows(x_GSD.reshape(X, D), tuple(asg_N // A for asg_N in asgs), dest_XA)
  ys, first = [], 0
  for x_ND, (size, buckets) in zip(xs, blocks):
    x_EBD = constrain(x_ND.reshape(E, size, D), ('expert', None, 'embed'))  # expert parallel: all-to-all
    y_EBD = expert_ffn_rows(x_EBD, w, n_rows - first, activation, buckets)
    ys.append(y_EBD.reshape(E * size, D))
    first += size
  weight_XA = (gates_GSA * kept_GSA).reshape(X, A).astype(x_GSD.dtype)
  return combine_rows(tuple(ys), weight_XA, dest_XA, asgs).reshape(G, S, D), kept_GSA


def ragged_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str):
  """Dropless: assignments sorted by expert, then grouped matmuls; `capacity` is ignored.

  The grouped matmuls are `jax.lax.ragged_dot` on accelerators with grouped-matmul kernels, `grouped_ffn`'s
  row tiles on CPU (where ragged_dot lowers to a dense masked product, E times the work).
  """
  del capacity
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], w.w_up_EDF.shape[0], G * S
  experts_N = experts_GSA.reshape(X * A)
  _, asg_N = jax.lax.sort((experts_N, jnp.arange(X * A, dtype=jnp.int32)), num_keys=1)
  dest_XA = jnp.zeros(X * A, jnp.int32).at[asg_N].set(jnp.arange(X * A, dtype=jnp.int32),
                                                       unique_indices=True).reshape(X, A)
  sizes_E = jnp.zeros(E, jnp.int32).at[experts_N].add(1)
  on_cpu = jax.default_backend() == 'cpu'
  if on_cpu:  # grouped_ffn's slack rows, read from token X (clipped): empty rows
    asg_N = jnp.concatenate([asg_N, jnp.full((GROUP_TILE,), X * A, jnp.int32)])
  x_ND, = dispatch_rows(x_GSD.reshape(X, D), (asg_N // A,), dest_XA)
  if on_cpu:
    y_ND = grouped_ffn(x_ND, w, sizes_E, activation)
  else:
    up_NF = jax.lax.ragged_dot(x_ND, w.w_up_EDF, sizes_E)
    gate_NF = None if w.w_gate_EDF is None else jax.lax.ragged_dot(x_ND, w.w_gate_EDF, sizes_E)
    y_ND = jax.lax.ragged_dot(activate(gate_NF, up_NF, activation), w.w_down_EFD, sizes_E)
  y_XD = combine_rows((y_ND,), gates_GSA.reshape(X, A).astype(x_GSD.dtype), dest_XA, (asg_N,))
  return y_XD.reshape(G, S, D), jnp.ones(experts_GSA.shape, dtype=bool)


DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCH: dict[str, DispatchFn] = {'einsum': einsum_dispatch, 'gather': gather_dispatch,
                                   'ragged': ragged_dispatch, 'dense': dense_dispatch}


def default_dispatch(platform: str | None = None, dropless: bool = False) -> str:
  """The implementation 'auto' resolves to: 'gather' for a capacity factor, 'ragged' for a dropless layer.

  Both keep the config's semantics on every platform (which tokens drop never depends on the machine). Measured
  on CPU (2-core AMD EPYC, float32, forward + backward of MoEFFN against a dense FFN of the same active FLOPs,
  experiments/bench_moe.py, paired interleaved medians; ratios move with machine load):
    8 experts, top-2, d_expert 512, cf 1.25:  gather 1.16-1.36x, einsum (S=128) 1.52-1.73x, ragged 1.12-1.13x;
    64 experts, top-8, d_expert 64, cf 1.25:  gather 1.89-2.6x,  einsum (S=128) 3.8-4.8x,  ragged 2.5-2.8x
  (ragged 1.4-1.5x and 3.5x in processes that draw the slow huge-page mode: BUILD.md, Benchmarks).
  Bounds: a capacity factor of 1.25 pads every expert buffer to 1.25x the routed rows (gather's floor), the
  one-hot einsums add ~0.2x of the FFN's FLOPs, and 64 narrow experts run batched [rows, 256] @ [256, 128]
  matmuls at ~80 GFLOP/s where the dense FFN's one wide matmul runs at ~200 (XLA:CPU profile).
  Dropless, ragged's grouped_ffn row tiles compute each expert's rows and at most one partial tile more, where
  gather with capacity = group size pays for the busiest expert on every expert (the peer Mixtral's training
  step at init, busiest expert 1.7x the mean: see experiments/bench_train.py). On GPU / TPU ragged uses
  jax.lax.ragged_dot (native grouped matmuls on TPU); gather's tail-bucket lax.switch is one conditional per
  layer and direction. GPU and TPU timings were not taken here.
  """
  del platform
  return 'ragged' if dropless else 'gather'


def resolve(name: str, dropless: bool = False) -> str:
  """The implementation `name` stands for here: 'auto' becomes the default for the layer's capacity rule."""
  return default_dispatch(jax.default_backend(), dropless) if name == 'auto' else name


def get_dispatch(name: str, dropless: bool = False) -> DispatchFn:
  """The dispatch function called `name`; 'auto' picks the default for a dropping or a dropless layer."""
  name = resolve(name, dropless)
  if name not in DISPATCH:
    raise ValueError(f'dispatch={name!r} is not implemented; available: {", ".join(sorted(DISPATCH))}')
  return DISPATCH[name]
