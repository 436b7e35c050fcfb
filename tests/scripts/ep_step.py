"""Loss and gradients of MoE models on several meshes against one device, and the collectives of each compiled
step; prints one JSON line.

Argument: a JSON list of {"experts": E, "dropless": bool, "mesh": spec, "dispatch": name}. Started by
tests/test_ep.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax import collectives, sharding
from slmjax.config import ModelConfig
from slmjax.model import create_model
from slmjax.steps import loss_fn

BATCH = np.random.default_rng(0).integers(0, 256, (16, 17), dtype=np.int32)


def model_config(experts: int, dropless: bool, dispatch: str) -> ModelConfig:
  return ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, n_experts=experts, top_k=2, d_expert=16,
                     group_size=32, max_seq_len=16, capacity_factor=None if dropless else 2.0, dispatch=dispatch)


def loss_and_grads(cfg, spec):
  """(loss, grads, compiled HLO text, {parameter path: global shape}) of one loss-and-gradient step."""
  graphdef, state = nnx.split(create_model(cfg, seed=0))
  step = jax.jit(jax.value_and_grad(lambda s, b: loss_fn(nnx.merge(graphdef, s), b)[0]))
  if spec is None:
    return (*step(state, BATCH), None)
  mesh = sharding.make_mesh(spec)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    batch = jax.device_put(BATCH, sharding.batch_sharding(mesh, BATCH.shape[0]))
    compiled = step.lower(state, batch).compile()
    loss, grads = compiled(state, batch)
  return loss, grads, collectives.collectives(compiled.as_text(), dict(mesh.shape))


@functools.lru_cache(maxsize=None)
def reference(experts, dropless):
  loss, grads, _ = loss_and_grads(model_config(experts, dropless, 'auto'), None)
  return loss, grads


def main():
  report = []
  for case in json.loads(sys.argv[1]):
    cfg = model_config(case['experts'], case['dropless'], case['dispatch'])
    ref_loss, ref_grads = reference(case['experts'], case['dropless'])
    loss, grads, found = loss_and_grads(cfg, case['mesh'])
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)
    params = [list(v.shape) for _, v in nnx.to_flat_state(nnx.state(create_model(cfg, seed=0), nnx.Param))]
    report.append({**case, 'loss_diff': abs(float(loss) - float(ref_loss)), 'grad_diff': max(jax.tree.leaves(diffs)),
                   'summary': collectives.summary(found), 'param_shapes': params,
                   'expert_all_gathers': [[list(map(list, c.shapes)), c.op]
                                          for c in collectives.over(found, 'expert', 'all-gather')],
                   'expert_all_to_alls': len(collectives.over(found, 'expert', 'all-to-all'))})
  print(json.dumps(report))


if __name__ == '__main__':
  main()
