"""A trained run's model, read back from its directory: config.json for the architecture, the latest checkpoint
for the parameters (what `experiments/sample.py` and inference benchmarks start from)."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from slmjax import checkpoint
from slmjax.config import ModelConfig, TrainConfig
from slmjax.model import Transformer, abstract_model
from slmjax.optim import make_optimizer
from slmjax.run_dir import RunDir


def load_model(path: str | os.PathLike) -> tuple[Transformer, int]:
  """(model with the run's latest checkpointed parameters, its step); one-line ValueError for a directory that
  holds no run or no checkpoint."""
  run = RunDir(path)
  if not run.config_path.exists():
    raise ValueError(f'{run.path} holds no run (no config.json); give --out=<a directory train.py or sweep.py '
                     'wrote, e.g. runs/<run_id>>')
  try:
    saved = json.loads(run.config_path.read_text())
    cfg, train_cfg = ModelConfig.from_dict(saved['model']), TrainConfig.from_dict(saved['train'])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{run.config_path} is not a run config slmjax wrote ({type(e).__name__}: {e})') from None
  step = checkpoint.latest_step(run.checkpoints)
  if step is None:
    raise ValueError(f'{run.path} has no checkpoint yet: train it first (or wait for its first save)')
  graph, state_like = nnx.split(abstract_model(cfg))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  state_like = on_device(state_like)
  params_like, _ = nnx.split_state(state_like, nnx.Param, ...)
  opt_like = on_device(jax.eval_shape(make_optimizer(train_cfg).init, params_like))
  with checkpoint.Checkpointer(run.checkpoints) as ckpt:
    state, _, _, _ = ckpt.restore(step, state_like, opt_like)
  return nnx.merge(graph, state), step
