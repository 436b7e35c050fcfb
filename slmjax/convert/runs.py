"""Imported models as slmjax run directories (what `slmjax.trained.load_model`, experiments/sample.py and
train.py --init_from read), and the one reader of either kind of source: a Hugging Face directory or a run."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from flax import nnx

from slmjax import atomic, checkpoint, convert, counting, trained, wsd
from slmjax.config import ModelConfig, TrainConfig
from slmjax.optim import make_optimizer
from slmjax.run_dir import RunDir

TOKENIZER = 'tokenizer.json'


def write_run(cfg: ModelConfig, state: nnx.State, out: str | os.PathLike, source: dict,
              tokenizer: str | os.PathLike | None = None) -> RunDir:
  """A run directory holding `state` as its step-0 checkpoint (with a fresh optimizer state), config.json
  with the model, default training settings and `source` (where it came from), and a copy of `tokenizer`."""
  run = RunDir(out)
  if run.path.exists() and any(run.path.iterdir()):
    raise ValueError(f'out dir {run.path} exists and is not empty; choose another --out')
  run.path.mkdir(parents=True, exist_ok=True)
  train_cfg = TrainConfig()
  if tokenizer:
    shutil.copy(tokenizer, run.path / TOKENIZER)
    source = {**source, 'tokenizer': TOKENIZER}
  params, _ = nnx.split_state(state, nnx.Param, ...)
  with checkpoint.Checkpointer(run.checkpoints) as ckpt:
    ckpt.save(0, state, make_optimizer(train_cfg).init(params), {}, {'tokens': 0, 'source': source})
  atomic.write_json(run.config_path, {
      'model': cfg.to_dict(), 'train': train_cfg.to_dict(), 'source': source,
      'data': {'data': None, 'data_fingerprint': None}, 'counts': counting.summary(cfg)})
  return run


def read_source(path: str | os.PathLike) -> tuple[ModelConfig, nnx.State, dict]:
  """(cfg, model state, info) of a Hugging Face model directory or an slmjax run directory; info holds
  'model_type' (of the checkpoint it came from, if any) and 'tokenizer' (a tokenizer.json path, if any)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ValueError(f'{path} ' + ('does not exist' if not path.exists() else 'is a file') + '; give a Hugging Face '
                     'model directory or a run directory')
  if (path / wsd.TRUNK).is_dir():  # a WSD run: its branches are the runs
    branches = sorted((p.name for p in path.glob('branch-*')), key=lambda name: int(name.partition('-')[2] or 0))
    raise ValueError(f'{path} is a WSD run; give one of its branches ({", ".join(branches) or "none yet"}) or '
                     f'{wsd.TRUNK}/')
  if (path / 'checkpoints').is_dir():
    model, step = trained.load_model(path)
    saved = json.loads((path / 'config.json').read_text()).get('source', {})
    info = {'model_type': saved.get('model_type'), 'step': step}
    if saved.get('tokenizer'):
      info['tokenizer'] = str(path / saved['tokenizer'])
    return model.cfg, nnx.state(model), info
  cfg, state = convert.from_hf(path)
  info = {'model_type': json.loads((path / 'config.json').read_text())['model_type']}
  if (path / TOKENIZER).is_file():
    info['tokenizer'] = str(path / TOKENIZER)
  return cfg, state, info
