"""Device meshes and sharding rules: JAX's own SPMD is the distributed engine (no home-made cluster layer).

A mesh has up to four named axes, written as a flag such as `--mesh=data:2,fsdp:1,expert:4,tensor:1` (`-1` =
the rest of the devices):
  data    data parallelism: the batch is split, parameters are replicated;
  fsdp    fully sharded data parallelism: the batch is split AND large weights are split on their d_model axis;
  expert  expert parallelism: expert weights and the dispatched token buffers [E, X, D] are split on the expert
          axis (XLA turns the dispatch into an all-to-all); the batch is split over it as well;
  tensor  tensor parallelism: attention heads, FFN / expert width and the vocabulary are split.
Parameters carry logical axis names (the `out_sharding` metadata set in `slmjax.layers.make_param`); `RULES` in
`slmjax.axes` maps them to mesh axes. A dimension the mesh axis does not divide is an error that names the axis
and the dimension.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slmjax.axes import BATCH_AXES, MESH_AXES, logical_to_spec
from slmjax.model import abstract_model


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
  """'data:2,expert:-1' -> {'data': 2, 'fsdp': 1, 'expert': n/2, 'tensor': 1}; checks the product is n_devices."""
  sizes: dict[str, int] = {}
  for item in filter(None, (s.strip() for s in spec.split(','))):
    name, _, value = item.partition(':')
    if name not in MESH_AXES:
      raise ValueError(f'--mesh: unknown axis {name!r}; axes are {", ".join(MESH_AXES)}')
    if name in sizes:
      raise ValueError(f'--mesh: axis {name!r} is given twice')
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f'--mesh: {item!r} is not AXIS:SIZE (e.g. data:2, or data:-1 for the rest)') from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise ValueError(f'--mesh: axis {name} has size {sizes[name]}; use a positive size or -1 for the rest')
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f'--mesh: only one axis may be -1, got {", ".join(rest)}')
  known = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if n_devices % known:
      raise ValueError(f'--mesh: the fixed axes use {known} devices, which does not divide the {n_devices} devices, '
                       f'so {rest[0]}:-1 has no whole size')
    sizes[rest[0]] = n_devices // known
  elif known != n_devices:
    raise ValueError(f'--mesh={spec} uses {known} devices but {n_devices} are available; make the sizes multiply '
                     f'to {n_devices} or give one axis -1')
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | None, devices=None) -> Mesh | None:
  """The mesh a `--mesh` flag describes over all devices (all processes); None for '' or None (no sharding)."""
  if not spec:
    return None
  devices = devices if devices is not None else jax.devices()
  sizes = parse_mesh(spec, len(devices))
  # Auto axes: XLA propagates shardings from the parameters and the batch through every op (GSPMD), so the
  # model code needs no per-op annotations; `slmjax.axes.constrain` pins the few layouts that matter (expert buffers).
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def hypothetical_mesh(spec: str) -> dict[str, int]:
  """Axis sizes of a mesh that need not exist here (for counting bytes per device); no -1 allowed."""
  sizes = [item.partition(':')[2] for item in spec.split(',') if item.strip()]
  if '-1' in [v.strip() for v in sizes]:
    raise ValueError(f'--mesh={spec}: give every axis a size to count bytes per device (-1 needs real devices)')
  n = math.prod(int(v) for v in sizes if v.strip().lstrip('-').isdigit() and int(v) > 0) or 1
  return parse_mesh(spec, n)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
  """A NamedSharding for every variable of an `nnx.split` state, from its logical axis names."""
  def sharding(path, var):
    names = var.get_metadata().get('out_sharding') if hasattr(var, 'get_metadata') else None
    shape = np.shape(var.get_value() if hasattr(var, 'get_value') else var)
    if not names:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(tuple(names), shape, dict(mesh.shape), '/'.join(map(str, path))))
  return nnx.map_state(sharding, state) if hasattr(nnx, 'map_state') else _map_flat(state, sharding)


def _map_flat(state: nnx.State, fn) -> Any:
  flat = [(path, fn(path, var)) for path, var in nnx.to_flat_state(state)]
  return nnx.from_flat_state(flat)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """Batch rows split over every batch-parallel axis; the batch must divide evenly."""
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % ways:
    raise ValueError(f'--batch_size={batch_size} must be a multiple of {ways} (the data x fsdp x expert mesh axes)')
  return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_placer(mesh: Mesh, batch_size: int):
  """`place(batch, whole=False)`: a global batch array from this process's rows (or, with whole=True, from a
  batch every process holds in full, such as the fixed held-out windows)."""
  target = batch_sharding(mesh, batch_size)

  def place(batch: np.ndarray, whole: bool = False) -> jax.Array:
    if whole:
      return jax.make_array_from_callback(batch.shape, target, lambda index: batch[index])
    return jax.make_array_from_process_local_data(target, batch)
  return place


def place_state(state, opt_state, *, mesh: Mesh, tx):
  """Put the model state on the mesh, and initialise the optimizer state there from the placed parameters.

  `opt_state` is only used for its structure: a jitted `tx.init` of sharded parameters gives moments that XLA
  shards like their parameters (zeros_like keeps its operand's sharding), without a host copy of either.
  """
  del opt_state
  state = jax.device_put(state, state_shardings(state, mesh))
  params, _ = nnx.split_state(state, nnx.Param, ...)
  return state, jax.jit(tx.init)(params)


def bytes_per_device(model_cfg, mesh_sizes: dict[str, int], bytes_per_param: float) -> float:
  """Weight bytes one device holds on a mesh of `mesh_sizes`: each parameter divided by the axes that split it."""
  total = 0.0
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(model_cfg), nnx.Param)):
    names = var.get_metadata().get('out_sharding') or (None,) * len(var.shape)
    spec = logical_to_spec(tuple(names), var.shape, mesh_sizes, '/'.join(map(str, path)))
    split = math.prod(mesh_sizes[axis] for axis in spec if axis)
    total += math.prod(var.shape) / split
  return total * bytes_per_param
