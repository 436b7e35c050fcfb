"""Collectives of a compiled program, read from its HLO text: what a sharded step really moves between devices.

`collectives(jax.jit(f).lower(*args).compile().as_text(), mesh)` lists every all-gather, all-reduce, all-to-all,
reduce-scatter and collective-permute with the bytes of its result on one device and the mesh axes its device
groups span, so a test can assert that tokens cross the expert axis by all-to-all and not by all-gather, and a
benchmark can add up the bytes per step. Counts are of instructions: none of slmjax's collectives sit in a loop.
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

import numpy as np

KINDS = ('all-gather', 'all-reduce', 'all-to-all', 'ragged-all-to-all', 'reduce-scatter', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4,
               's64': 8, 'u64': 8, 'f64': 8}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(KINDS) + r')(-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([\d,]*)\]')
_EXPLICIT = re.compile(r'replica_groups=\{(\{[\d,{} ]*\})\}')
_IOTA = re.compile(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')
_NAMED = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                    r" \{([^}]*)\}")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_PAIRS = re.compile(r'source_target_pairs=\{(\{[\d,{} ]*\})\}')


class Collective(NamedTuple):
  kind: str
  shapes: tuple[tuple[int, ...], ...]  # result shapes on one device (several for a tuple-valued collective)
  bytes: int  # bytes of the result on one device
  axes: tuple[str, ...]  # mesh axes that vary inside its device groups (all axes if the groups are not given)
  op: str  # the JAX operation it came from (HLO metadata op_name), '' if not recorded


def _iota(shape, dims, perm) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return (ids.transpose(perm) if perm else ids).reshape(shape)


def _ints(text: str | None) -> list[int]:
  return [int(v) for v in text.split(',')] if text else []


def _groups(line: str) -> list[list[int]] | None:
  """Device groups of one collective: explicit {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm), Shardy's
  mesh['a'=2,'b'=4](, device_ids=([dims]T(perm))) {'b'}, or permute pairs."""
  named = _NAMED.search(line)
  if named:
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    sizes = [int(n) for _, n in axes]
    ids = (_iota(sizes, _ints(named.group(2)), _ints(named.group(3))) if named.group(2)
           else np.arange(math.prod(sizes)).reshape(sizes))
    chosen = [i for i, (a, _) in enumerate(axes) if f"'{a}'" in named.group(4)]
    rest = [i for i in range(len(axes)) if i not in chosen]
    return ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen)).tolist()
  iota = _IOTA.search(line)
  if iota:
    return _iota((_ints(iota.group(1))[0], -1), _ints(iota.group(2)), _ints(iota.group(3))).tolist()
  found = _EXPLICIT.search(line) or _PAIRS.search(line)
  if not found:
    return None
  return [[int(v) for v in g.split(',') if v.strip()] for g in re.findall(r'\{([\d, ]*)\}', found.group(1))]


def _axes(groups: list[list[int]] | None, mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """Mesh axes along which devices of one group differ (device i sits at np.unravel_index(i) of the mesh)."""
  names = tuple(mesh_shape)
  if not groups or not any(len(g) > 1 for g in groups):
    return () if groups else names
  dims = tuple(mesh_shape.values())
  varying = set()
  for group in groups:
    coords = np.array([np.unravel_index(i, dims) for i in group])
    varying |= {names[a] for a in range(len(dims)) if len(set(coords[:, a])) > 1}
  return tuple(n for n in names if n in varying)


def collectives(hlo_text: str, mesh_shape: dict[str, int]) -> list[Collective]:
  """Every collective instruction of a compiled HLO module that moves data (groups of one device are left out);
  `mesh_shape` is {axis: size} in the mesh's order."""
  found = []
  for line in hlo_text.splitlines():
    op = _OP.match(line)
    if not op:
      continue
    shapes = [(dt, tuple(int(v) for v in dims.split(',') if v)) for dt, dims in _SHAPE.findall(op.group(1))]
    if op.group(3) and len(shapes) > 1:  # an async start's tuple holds the operand too: keep the result
      shapes = shapes[-1:]
    nbytes = sum(DTYPE_BYTES[dt] * math.prod(s) for dt, s in shapes)
    groups = _groups(line)
    if groups is not None and all(len(g) <= 1 for g in groups) and op.group(2) != 'collective-permute':
      continue  # groups of one device (a psum over an axis of size 1): nothing moves
    name = _OPNAME.search(line)
    found.append(Collective(op.group(2), tuple(s for _, s in shapes), nbytes, _axes(groups, mesh_shape),
                            name.group(1) if name else ''))
  return found


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {'count': n, 'bytes': total result bytes on one device}} over the collectives found."""
  out: dict[str, dict[str, int]] = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  for c in found:
    out[c.kind]['count'] += 1
    out[c.kind]['bytes'] += c.bytes
  return dict(sorted(out.items()))


def over(found: list[Collective], axis: str, kind: str | None = None) -> list[Collective]:
  """The collectives (of one kind) whose device groups span mesh axis `axis`."""
  return [c for c in found if axis in c.axes and kind in (None, c.kind)]
