"""Expert-parallel dispatch against one device, and the collectives of each compiled program; prints one JSON line.

Argument: a JSON object {"layer": [case, ...], "model": [case, ...]}, a case being {"experts": E, "top_k": k,
"dropless": bool, "mesh": spec, "dispatch": name} and optionally "ragged": true, which runs the dropless
exchange through `jax.lax.ragged_all_to_all` as GPU / TPU would, emulated here from its documented semantics
(XLA:CPU has none). Layer cases run one MoE dispatch (loss and gradients with
respect to tokens, gates and expert weights); model cases a whole model's loss-and-gradient step. Started by
tests/test_ep.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from slmjax import collectives, dispatch, sharding
from slmjax.axes import BATCH_AXES, logical_to_spec
from slmjax.config import ModelConfig
from slmjax.dispatch import alltoall
from slmjax.dispatch.experts import ExpertWeights
from slmjax.model import create_model
from slmjax.steps import loss_fn

G, S, D, F = 8, 32, 16, 8  # 256 tokens in 8 groups: one group per device on 8 devices
BATCH = np.random.default_rng(0).integers(0, 256, (16, 17), dtype=np.int32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all from its docstring: source s's rows [input_offsets[j], + send_sizes[j]) land in
  peer j's output at output_offsets[j] (all offsets and sizes as the source holds them); other rows keep
  `output`."""
  del recv_sizes, axis_index_groups
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  rows_SND, starts, sizes, lands = gather(operand), gather(input_offsets), gather(send_sizes), gather(output_offsets)
  row_N = jnp.arange(output.shape[0])
  for s in range(rows_SND.shape[0]):
    here_N = (row_N >= lands[s, me]) & (row_N < lands[s, me] + sizes[s, me])
    source_N = jnp.clip(starts[s, me] + row_N - lands[s, me], 0, operand.shape[0] - 1)
    output = jnp.where(here_N[:, None], rows_SND[s][source_N], output)
  return output


def layer_inputs(experts, top_k):
  rng = np.random.default_rng(experts + top_k)
  x_GSD = rng.normal(size=(G, S, D)).astype(np.float32)
  scores_GSE = rng.uniform(size=(G, S, experts)) + np.linspace(0.5, 0, experts)  # uneven loads: some drops
  experts_GSA = np.argsort(-scores_GSE, axis=-1)[..., :top_k].astype(np.int32)
  gates_GSA = rng.uniform(0.1, 1.0, size=(G, S, top_k)).astype(np.float32)
  normal = lambda *shape: (rng.normal(size=shape) * shape[1] ** -0.5).astype(np.float32)
  return x_GSD, gates_GSA, experts_GSA, ExpertWeights(normal(experts, D, F), normal(experts, D, F),
                                                      normal(experts, F, D))


def layer_step(name, capacity):
  def loss(x_GSD, gates_GSA, w, experts_GSA):
    y_GSD, kept_GSA = dispatch.DISPATCH[name](x_GSD, gates_GSA, experts_GSA, w, capacity, 'swiglu')
    return jnp.sum(jnp.sin(y_GSD) * jnp.cos(jnp.arange(D))), jnp.mean(kept_GSA.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def run(step, args, spec, place):
  """step(*args) on one device (spec None) or on the mesh, with the collectives of the compiled program."""
  if spec is None:
    return step(*args), []
  mesh = sharding.make_mesh(spec)
  with jax.set_mesh(mesh):
    args = place(mesh, args)
    compiled = step.lower(*args).compile()
    return compiled(*args), collectives.collectives(compiled.as_text(), dict(mesh.shape))


def place_layer(mesh, args):
  x_GSD, gates_GSA, experts_GSA, w = args[0], args[1], args[3], args[2]
  batch = NamedSharding(mesh, P(BATCH_AXES))
  names = {0: ('expert', 'embed', 'mlp'), 1: ('expert', 'embed', 'mlp'), 2: ('expert', 'mlp', 'embed')}
  w = ExpertWeights(*(jax.device_put(a, NamedSharding(mesh, logical_to_spec(names[i], a.shape, dict(mesh.shape),
                                                                              'w'))) for i, a in enumerate(w)))
  return jax.device_put(x_GSD, batch), jax.device_put(gates_GSA, batch), w, jax.device_put(experts_GSA, batch)


def layer_args(experts, top_k):
  x_GSD, gates_GSA, experts_GSA, w = layer_inputs(experts, top_k)
  return x_GSD, gates_GSA, w, experts_GSA


def capacity_of(experts, top_k, dropless):
  return S if dropless else int(np.ceil(1.25 * S * top_k / experts))


@functools.lru_cache(maxsize=None)
def layer_reference(experts, top_k, dropless):
  """One device: einsum (the reference; it drops what every capacity dispatch drops), ragged when dropless."""
  step = layer_step('ragged' if dropless else 'einsum', capacity_of(experts, top_k, dropless))
  return run(step, layer_args(experts, top_k), None, None)[0]


def layer_case(case):
  if not case.get('ragged'):
    return layer_run(case)
  saved = alltoall.ragged_exchange, jax.lax.ragged_all_to_all
  alltoall.ragged_exchange, jax.lax.ragged_all_to_all = lambda: True, emulated_ragged_all_to_all
  try:
    return layer_run(case)
  finally:
    alltoall.ragged_exchange, jax.lax.ragged_all_to_all = saved


def layer_run(case):
  (_, ref_kept), ref_grads = layer_reference(case['experts'], case['top_k'], case['dropless'])
  step = layer_step(case['dispatch'], capacity_of(case['experts'], case['top_k'], case['dropless']))
  ((_, kept), grads), found = run(step, layer_args(case['experts'], case['top_k']), case['mesh'], place_layer)
  return grads, ref_grads, found, {'kept': float(kept), 'ref_kept': float(ref_kept)}


def model_config(case) -> ModelConfig:
  return ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, n_experts=case['experts'], top_k=case['top_k'],
                     d_expert=16, group_size=32, max_seq_len=16, dispatch=case['dispatch'],
                     capacity_factor=None if case['dropless'] else 2.0)


def place_model(mesh, args):
  state, batch = args
  return (jax.device_put(state, sharding.state_shardings(state, mesh)),
          jax.device_put(batch, sharding.batch_sharding(mesh, batch.shape[0])))


def model_case(case):
  cfg = model_config(case)
  graphdef, state = nnx.split(create_model(cfg, seed=0))
  step = jax.jit(jax.value_and_grad(lambda s, b: loss_fn(nnx.merge(graphdef, s), b)[0]))
  (ref_loss, ref_grads), _ = run(step, (state, BATCH), None, None)
  (loss, grads), found = run(step, (state, BATCH), case['mesh'], place_model)
  shapes = [list(v.shape) for _, v in nnx.to_flat_state(nnx.state(state, nnx.Param))]
  return grads, ref_grads, found, {'loss_diff': abs(float(loss) - float(ref_loss)), 'param_shapes': shapes}


def main():
  cases = json.loads(sys.argv[1])
  report = {}
  for kind, fn in (('layer', layer_case), ('model', model_case)):
    report[kind] = []
    for case in cases.get(kind, []):
      start = time.perf_counter()
      grads, ref_grads, found, extra = fn(case)
      # Largest difference relative to the largest entry of its gradient (sums over 256 tokens reach ~10).
      diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / max(1.0, float(jnp.max(jnp.abs(b))))),
                           grads, ref_grads)
      report[kind].append({**case, **extra, 'grad_diff': max(jax.tree.leaves(diffs)),
                           'seconds': time.perf_counter() - start,
                           'summary': collectives.summary(found),
                           'expert_all_gathers': [[list(map(list, c.shapes)), c.op]
                                                  for c in collectives.over(found, 'expert', 'all-gather')],
                           'expert_all_to_alls': len(collectives.over(found, 'expert', 'all-to-all'))})
  print(json.dumps(report))


if __name__ == '__main__':
  main()
