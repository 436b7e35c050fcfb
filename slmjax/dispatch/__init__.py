"""Token-to-expert dispatch implementations behind one interface.

Every implementation has the signature
  dispatch(x_GSD, gates_GSA, experts_GSA, weights, capacity, activation, matmul='xla') -> (y_GSD, kept_GSA)
where tokens come split into G groups of S tokens, each token has A = top_k (expert index, gate) pairs, `capacity`
is C, the slots per expert per group, and `kept_GSA` says which assignments were computed (not dropped for lack
of capacity). A token whose assignments are all dropped gets a zero output: the residual carries it through.
`matmul` is ModelConfig.matmul: the row tiles on CPU (ragged, alltoall; einsum and gather on one CPU device) run
their 2-D products in that vendor GEMM; batched products stay XLA's.

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
          back. Forward and backward are gathers only: no scatter-add, no [G,S,E,C] tensor. On one CPU device,
          with a tile's rows an expert, the kept rows are packed by expert and run as grouped.py's row tiles
          instead (same kept set; `grouped.row_tiles_pay`).
  ragged  dropless: assignments sorted by expert, grouped matmuls with `jax.lax.ragged_dot`; `capacity` ignored.
  dense   every expert on every token, mixed by the gates: the correctness oracle (E / k times the FLOPs).
  alltoall  expert parallel (slmjax/dispatch/alltoall.py): under shard_map each device sends its tokens' rows to
          the devices holding their experts with all_to_all (capacity C per device pair; dropless: padded, or
          ragged_all_to_all on GPU / TPU) and gets the outputs back; 'auto' picks it on a mesh whose expert
          axis is > 1, where XLA's partitioner would move the tokens with all-gathers instead.
  select  decode: each assignment gathers its expert's weights, so a step of few tokens reads only the experts they
          chose (not all E); dropless, and `gather` with a slot for every token once there are as many
          assignments as experts (on CPU 1.1-5x faster than `ragged` at decode's few tokens, as measured).

One implementation a module: einsum.py, gather.py, ragged.py (with grouped.py, its row tiles on CPU), dense.py,
select.py, alltoall.py.
What they share: experts.py (the stacked expert weights and their FFNs), slots.py (capacity slots in token
order), rows.py (row gathers into and out of expert buffers, gathers in the backward pass too), bits.py (bf16
slices and updates on uint16 bits, where XLA:CPU would convert whole arrays to f32).

Shape letters: slmjax/shapes.py (here G, S, A, E, C, D).
"""

from __future__ import annotations

from typing import Callable

import jax

from slmjax.dispatch.alltoall import alltoall_dispatch, expert_mesh
from slmjax.dispatch.dense import dense_dispatch
from slmjax.dispatch.einsum import einsum_dispatch
from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.gather import gather_dispatch
from slmjax.dispatch.ragged import ragged_dispatch
from slmjax.dispatch.select import select_dispatch

__all__ = ['DISPATCH', 'DispatchFn', 'ExpertWeights', 'default_dispatch', 'get_dispatch', 'resolve']

DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCH: dict[str, DispatchFn] = {'einsum': einsum_dispatch, 'gather': gather_dispatch,
                                   'ragged': ragged_dispatch, 'dense': dense_dispatch,
                                   'select': select_dispatch, 'alltoall': alltoall_dispatch}


def default_dispatch(dropless: bool = False) -> str:
  """The implementation 'auto' resolves to: 'alltoall' on a mesh (the current one, `jax.set_mesh`) whose expert
  axis is > 1; else 'gather' for a capacity factor, 'ragged' for a dropless layer, the fastest with those
  semantics as measured (README, "Speed"; BUILD.md, "Benchmarks"), the same on every platform."""
  mesh = expert_mesh()
  if mesh is not None and mesh.shape['expert'] > 1:
    return 'alltoall'
  return 'ragged' if dropless else 'gather'


def resolve(name: str, dropless: bool = False) -> str:
  """The implementation `name` stands for here: 'auto' becomes the default for the layer's capacity rule (and
  the current mesh)."""
  return default_dispatch(dropless) if name == 'auto' else name


def get_dispatch(name: str, dropless: bool = False) -> DispatchFn:
  """The dispatch function called `name`; 'auto' picks the default for a dropping or a dropless layer."""
  name = resolve(name, dropless)
  if name not in DISPATCH:
    raise ValueError(f'dispatch={name!r} is not implemented; available: {", ".join(sorted(DISPATCH))}')
  return DISPATCH[name]
