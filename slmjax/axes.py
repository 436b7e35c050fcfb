"""Logical axis names and the mesh axes they map to: what model code needs to lay tensors out.

A leaf module (jax only, nothing from slmjax), so model code such as the dispatch can pin layouts without
importing the mesh and placement code of `slmjax.sharding`, which itself imports the model. Parameters carry
logical axis names (the `out_sharding` metadata set in `slmjax.layers.make_param`); `RULES` maps them to mesh
axes, `ACTIVATION_RULES` adds the names only activations use.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')  # every axis that does not split a weight's width also splits the batch
RULES: dict[str, str | None] = {
    'batch': None,  # handled by BATCH_AXES
    'embed': 'fsdp',
    'vocab': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'mlp': 'tensor',
    'expert': 'expert',
}
# Activation-only names: `group` is the dispatch group axis of expert buffers [E, G, C, D], split over the
# batch axes that do not split the experts, so moving tokens from [G, S, D] to [E, G, C, D] is an all-to-all.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {'batch': BATCH_AXES, 'group': ('data', 'fsdp')}


def logical_to_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape, what: str) -> P:
  """PartitionSpec of a tensor with logical axis `names` on a mesh of `mesh_shape` ({axis: size}); raises if a
  mesh axis does not divide its dimension."""
  spec = []
  for name, size in zip(names, shape):
    axis = RULES.get(name) if name else None
    if axis is None or mesh_shape.get(axis, 1) == 1:
      spec.append(None)
      continue
    if size % mesh_shape[axis]:
      raise ValueError(f'--mesh axis {axis}:{mesh_shape[axis]} does not divide the {name} dimension ({size}) of '
                       f'{what}; choose a size that divides {size}')
    spec.append(axis)
  return P(*spec)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Ask XLA to lay `x` out by logical axis names on the current mesh (`jax.set_mesh`); no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = []
  for name, size in zip(names, x.shape):
    axes = ACTIVATION_RULES.get(name) or ((RULES[name],) if RULES.get(name) else ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    spec.append(axes if axes and size % ways == 0 else None)
  return jax.lax.with_sharding_constraint(x, P(*spec))
