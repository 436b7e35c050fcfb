"""Run one MoE loss-and-gradient step on several meshes and on one device; print max differences as JSON.

Arguments: mesh specs; a first argument --dropless runs the dropless model (ragged dispatch) instead.

Started by tests/test_sharding.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax import sharding
from slmjax.config import ModelConfig
from slmjax.model import create_model
from slmjax.steps import loss_fn

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=8, top_k=2, d_expert=16, group_size=32,
                  max_seq_len=16, capacity_factor=2.0)


def loss_and_grads(mesh, cfg):
  graphdef, state = nnx.split(create_model(cfg, seed=0))
  batch = np.random.default_rng(0).integers(0, 256, (16, 17), dtype=np.int32)

  @jax.jit
  def step(state, batch):
    def f(state):
      loss, aux = loss_fn(nnx.merge(graphdef, state), batch)
      return loss
    return jax.value_and_grad(f)(state)

  if mesh is None:
    return step(state, batch), None
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, batch.shape[0]))
    return step(state, batch), state


def main():
  specs = sys.argv[1:]
  cfg = CFG
  if specs and specs[0] == '--dropless':
    specs, cfg = specs[1:], CFG.replace(capacity_factor=None)
  (ref_loss, ref_grads), _ = loss_and_grads(None, cfg)
  report = {}
  for spec in specs:
    (loss, grads), state = loss_and_grads(sharding.make_mesh(spec), cfg)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)
    expert = state['blocks'][0]['ffn']['w_up_EDF'][...]
    shard_shapes = sorted({tuple(s.data.shape) for s in expert.addressable_shards})
    report[spec] = {'loss_diff': abs(float(loss) - float(ref_loss)), 'grad_diff': max(jax.tree.leaves(diffs)),
                    'expert_shard_shapes': shard_shapes, 'expert_shape': list(expert.shape)}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
