"""Expert parallelism by all-to-all: tokens travel only to the devices that hold their experts, and back.

Under `jax.shard_map` over every mesh axis each device holds its own tokens (split over data, fsdp and expert, as
the batch is) and its E / EP experts (EP = the expert axis; their width split over tensor). A device routes its
tokens, packs the rows for each peer into a send buffer, exchanges it with `jax.lax.all_to_all` over the expert
axis, runs its local experts, exchanges the outputs back and combines them with the gates. XLA's partitioner,
given only the expert sharding (the gather dispatch), moves the same tokens with all-gathers and all-reduces of
the whole buffer instead.

  capacity  (C < S) the send buffer is [E, M, D] with M = (local groups) x C slots per expert: exactly the
            assignments the gather / einsum dispatch keeps (the same slots, token order), so the result is the
            one-device result; the local experts run as batched matmuls on [E / EP, EP x M, D].
  dropless  (C = S) rows for one peer fill at most R = X x min(k, E / EP) rows, so the send buffer is [EP x R, D],
            each peer's block sorted by expert; the receiver sorts what it got by its local experts and runs
            them as grouped matmuls (`sorted_rows_ffn`). On GPU / TPU the exchange is
            `jax.lax.ragged_all_to_all` (only the used rows move); XLA:CPU has none, so there the padded block
            moves whole (same layout, same result).
A weight replicated over some axes (data, fsdp) and tokens replicated over tensor are cast to varying over every
axis on entry, so the transposes sum their cotangents across devices (custom VJPs inside included); the partial
outputs of a tensor-split expert width are summed over tensor on the way out.

Shape letters: slmjax/shapes.py (here G, S, A, C, D, F; E experts, all of them or one device's; X tokens on one
device; M rows of one expert's buffer; N rows of a flattened buffer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from slmjax.axes import BATCH_AXES, MESH_AXES
from slmjax.dispatch.experts import ExpertWeights, expert_ffn
from slmjax.dispatch.gather import expert_rows, gather_dispatch
from slmjax.dispatch.ragged import ragged_dispatch, slack_rows, sort_by_expert, sorted_rows_ffn
from slmjax.dispatch.rows import combine_rows, dispatch_rows
from slmjax.dispatch.slots import slots_and_counts

EXPERT = 'expert'


def ragged_exchange() -> bool:
  """Whether this backend has `ragged_all_to_all` (GPU, TPU); XLA:CPU answers UNIMPLEMENTED."""
  return jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu')


def expert_mesh():
  """The current (abstract) mesh if it has slmjax's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def alltoall_dispatch(x_GSD, gates_GSA, experts_GSA, w: ExpertWeights, capacity: int, activation: str,
                      matmul: str = 'xla'):
  """The dispatch interface of `slmjax.dispatch`, expert parallel over the current mesh's expert axis. Without a
  mesh, or with fewer dispatch groups than the data x fsdp x expert devices can split evenly (a small evaluation
  or decoding batch), the gather dispatch (ragged when dropless) computes the same result, XLA placing it."""
  G, S, D = x_GSD.shape
  mesh = expert_mesh()
  if mesh is None or G % math.prod(mesh.shape[a] for a in BATCH_AXES):
    return (ragged_dispatch if capacity >= S else gather_dispatch)(x_GSD, gates_GSA, experts_GSA, w, capacity,
                                                                   activation, matmul)
  names = tuple(n for n, a in zip(('gate', 'up', 'down'), w) if a is not None)
  arrays = tuple(a for a in w if a is not None)
  specs = tuple(P(EXPERT, 'tensor', None) if n == 'down' else P(EXPERT, None, 'tensor') for n in names)
  body = functools.partial(_dropless if capacity >= S else _capacity, names=names, activation=activation,
                           matmul=matmul, capacity=capacity, n_experts=w.w_up_EDF.shape[0], ep=mesh.shape[EXPERT])
  return jax.shard_map(body, in_specs=(P(BATCH_AXES),) * 3 + specs, out_specs=(P(BATCH_AXES),) * 2)(
      x_GSD, gates_GSA, experts_GSA, *arrays)


def _varying(a: jax.Array) -> jax.Array:
  """`a` cast to varying over every mesh axis: the transpose then sums its cotangent over the axes it was
  replicated on, which a custom VJP's backward inside the map cannot know to do."""
  aval = jax.typeof(a)
  varying = aval.mat.varying if hasattr(aval, 'mat') else aval.vma  # jax >= 0.10 / older
  return jax.lax.pcast(a, tuple(n for n in MESH_AXES if n not in varying), to='varying')


def _local_weights(arrays, names) -> ExpertWeights:
  w = dict(zip(names, map(_varying, arrays)))
  return ExpertWeights(w.get('gate'), w['up'], w['down'])


def _finish(y_XD, kept_GSA, shape):
  """Sum the tensor-split partial outputs; back to [G, S, D]."""
  return jax.lax.psum(y_XD, 'tensor').reshape(shape), kept_GSA


def _capacity(x_GSD, gates_GSA, experts_GSA, *arrays, names, activation, matmul, capacity, n_experts, ep):
  """Fixed C slots per expert per local group: a dense [E, M, D] send buffer, one all_to_all each way."""
  del matmul  # batched products stay XLA's (slmjax/dispatch/__init__.py)
  G, S, D = x_GSD.shape
  A, E, X, M = experts_GSA.shape[-1], n_experts, G * S, G * capacity
  w = _local_weights(arrays, names)
  slot_GSA, kept_GSA, count_GE = slots_and_counts(experts_GSA, E, capacity)
  dest_XA, asgs, _ = expert_rows(experts_GSA, slot_GSA, kept_GSA, count_GE, (M,))
  send_ND, = dispatch_rows(_varying(x_GSD).reshape(X, D), (asgs[0] // A,), dest_XA)
  recv_ND = jax.lax.all_to_all(send_ND, EXPERT, 0, 0, tiled=True)  # rows: (source, local expert, slot)
  el = E // ep
  x_EMD = recv_ND.reshape(ep, el, M, D).transpose(1, 0, 2, 3).reshape(el, ep * M, D)
  y_EMD = expert_ffn(x_EMD, w, activation)
  back_ND = y_EMD.reshape(el, ep, M, D).transpose(1, 0, 2, 3).reshape(E * M, D)
  y_ND = jax.lax.all_to_all(back_ND, EXPERT, 0, 0, tiled=True)
  weight_XA = _varying((gates_GSA * kept_GSA).reshape(X, A).astype(x_GSD.dtype))
  return _finish(combine_rows((y_ND,), weight_XA, dest_XA, asgs), kept_GSA, x_GSD.shape)


def _exchange(x_ND, rows_to_peer, rows_from_peer, block: int):
  """Peer j's block (rows [j * block, j * block + rows_to_peer[j])) to peer j, where it lands at this device's
  block; the padded all_to_all where the backend has no ragged one."""
  if not ragged_exchange():
    return jax.lax.all_to_all(x_ND, EXPERT, 0, 0, tiled=True)
  ep = rows_to_peer.shape[0]
  offsets = jnp.arange(ep, dtype=jnp.int32) * block
  here = jnp.full((ep,), jax.lax.axis_index(EXPERT) * block, jnp.int32)
  return jax.lax.ragged_all_to_all(x_ND, jnp.zeros_like(x_ND), offsets, rows_to_peer, here, rows_from_peer,
                                   axis_name=EXPERT)


def _dropless(x_GSD, gates_GSA, experts_GSA, *arrays, names, activation, matmul, capacity, n_experts, ep):
  """Every assignment computed: per-peer blocks of R rows, sorted by expert, exchanged, re-sorted by local expert
  on arrival, grouped matmuls, and the same way back."""
  del capacity
  G, S, D = x_GSD.shape
  A, E, X = experts_GSA.shape[-1], n_experts, G * S
  el = E // ep
  R, w, i32 = X * min(A, el), _local_weights(arrays, names), jnp.int32
  # Sender: assignments sorted by expert (so by peer, then by the peer's local expert), each peer's run copied
  # to the front of its block of R rows.
  sorted_N, asg_N, sizes_E = sort_by_expert(experts_GSA.reshape(X * A), E)
  rows_to_peer = sizes_E.reshape(ep, el).sum(axis=1)
  peer_N = sorted_N // el
  row_N = peer_N * R + jnp.arange(X * A, dtype=i32) - (jnp.cumsum(rows_to_peer) - rows_to_peer)[peer_N]
  dest_XA = jnp.zeros(X * A, i32).at[asg_N].set(row_N, unique_indices=True).reshape(X, A)
  send_asg_N = jnp.full((ep * R,), X * A, i32).at[row_N].set(asg_N, unique_indices=True)
  send_ND, = dispatch_rows(_varying(x_GSD).reshape(X, D), (send_asg_N // A,), dest_XA)
  # Receiver: block s holds source s's rows for local experts 0, 1, ... (counts from_EE[s]); a stable sort by
  # local expert orders them (expert, source, row), empty rows last.
  from_EE = jax.lax.all_to_all(sizes_E.reshape(ep, el), EXPERT, 0, 0, tiled=True)
  rows_from_peer = from_EE.sum(axis=1)
  recv_ND = _exchange(send_ND, rows_to_peer, rows_from_peer, R)
  within_N = jnp.tile(jnp.arange(R, dtype=i32), ep)
  ends_NE = jnp.repeat(jnp.cumsum(from_EE, axis=1), R, axis=0)
  local_N = jnp.sum(within_N[:, None] >= ends_NE, axis=1)  # el for an empty row
  _, order_N = jax.lax.sort((local_N, jnp.arange(ep * R, dtype=i32)), num_keys=1, is_stable=True)
  sizes_local_E = from_EE.sum(axis=0)
  used = jnp.sum(sizes_local_E)
  slot_N = jnp.zeros(ep * R, i32).at[order_N].set(jnp.arange(ep * R, dtype=i32), unique_indices=True)
  slot_N1 = jnp.where(local_N < el, slot_N, ep * R + slack_rows())[:, None]  # past the end: nothing to return
  order_N = jnp.concatenate([order_N, jnp.full((slack_rows(),), ep * R, i32)])
  y_ND = sorted_rows_ffn(recv_ND, order_N, slot_N1, w, sizes_local_E, activation, matmul)
  back_N1 = jnp.where(jnp.arange(order_N.shape[0]) < used, order_N, ep * R)[:, None]
  ret_ND, = dispatch_rows(y_ND, (slot_N1[:, 0],), back_N1)
  y_back_ND = _exchange(ret_ND, rows_from_peer, rows_to_peer, R)
  weight_XA = _varying(gates_GSA.reshape(X, A).astype(x_GSD.dtype))
  y_XD = combine_rows((y_back_ND,), weight_XA, dest_XA, (send_asg_N,))
  return _finish(y_XD, jnp.ones(experts_GSA.shape, dtype=bool), x_GSD.shape)


def forward_exchange_bytes(tokens: int, d_model: int, n_experts: int, top_k: int, ep: int, value_bytes: int,
                           capacity: int, group_size: int, ragged: bool = False) -> int:
  """Bytes of one MoE layer's forward all-to-all results on one device holding `tokens` tokens: dispatch plus
  combine (the backward moves the same again). Capacity: E x (groups x C) rows; dropless: EP x R rows padded
  (the dropless layer's [EP, E / EP] int32 row counts too), or with `ragged` the k rows a token really sends.
  A fraction (EP - 1) / EP of it leaves the device when the experts are evenly loaded."""
  if capacity < group_size:
    return 2 * n_experts * (tokens // group_size) * capacity * d_model * value_bytes
  rows = tokens * top_k if ragged else ep * tokens * min(top_k, n_experts // ep)
  return 2 * rows * d_model * value_bytes + 4 * n_experts
