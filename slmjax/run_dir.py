"""A run's directory: config.json, metrics.jsonl, summary.json, checkpoints/ and tensorboard/.

`RunDir.check` decides, before anything is written, whether a directory is new, resumable (same architecture,
same experiment; only RESUMABLE_FIELDS may differ) or an error. Only the writer process (process 0) writes JSON;
every process writes its shards of the checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib

from slmjax import atomic
from slmjax.config import RESUMABLE_FIELDS, ModelConfig, TrainConfig


class RunDir:
  """Paths and JSON files of one training run in `path`."""

  def __init__(self, path: str | os.PathLike, writer: bool = True):
    self.path, self.writer = pathlib.Path(path), writer
    self.config_path = self.path / 'config.json'
    self.summary_path = self.path / 'summary.json'
    self.metrics_path = self.path / 'metrics.jsonl'
    self.checkpoints = self.path / 'checkpoints'
    self.tensorboard = self.path / 'tensorboard'

  def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig, checkpointed: bool = True) -> dict | None:
    """config.json of the run already here (None if there is none); ValueError if it cannot be resumed. A run
    without a checkpoint (`checkpointed` False: killed before its first) holds nothing to resume: None, and the
    new run starts over in its place, whatever its settings."""
    if not self.path.exists():
      return None
    if not self.path.is_dir():
      raise ValueError(f'out dir {self.path} exists and is not a directory')
    if not self.config_path.exists():
      if any(self.path.iterdir()):
        raise ValueError(f'out dir {self.path} is not empty and holds no run (no config.json); choose another')
      return None
    try:
      previous = json.loads(self.config_path.read_text())
      model, train, _ = previous['model'], previous['train'], previous['data']['data_fingerprint']
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise ValueError(f'{self.config_path} is not a run config slmjax wrote ({type(e).__name__}: {e}); restore it '
                       'or choose another --out') from None
    if not checkpointed:  # ours, but killed before its first checkpoint: start over
      return None
    # Through the dataclasses, so fields added to a config since the run started compare at their defaults.
    changed = _changes(ModelConfig.from_dict(model).to_dict(), model_cfg.to_dict())
    if changed:
      raise ValueError(f'out dir {self.path} holds a run with a different architecture ({changed}); use another --out')
    changed = _changes(TrainConfig.from_dict(train).to_dict(), train_cfg.to_dict(), RESUMABLE_FIELDS)
    if changed:
      raise ValueError(f'out dir {self.path} holds a run with other training settings ({changed}); '
                       f'only {", ".join(RESUMABLE_FIELDS)} may change when resuming')
    return previous

  def write_json(self, path: pathlib.Path, obj) -> None:
    if self.writer:
      atomic.write_json(path, obj)

  def read_summary(self) -> dict | None:
    return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

  def metrics(self, start_step: int) -> 'MetricsLog':
    return MetricsLog(self.metrics_path, start_step, enabled=self.writer)


def _changes(old: dict, new: dict, allowed: tuple[str, ...] = ()) -> str:
  return ', '.join(f'{k} {old[k]!r} -> {v!r}' for k, v in new.items() if k not in allowed and old[k] != v)


class MetricsLog:
  """metrics.jsonl, one JSON object per line; on (re)start, lines past the restored step are dropped."""

  def __init__(self, path: pathlib.Path, start_step: int, enabled: bool = True):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      keep = [line for line in path.read_text().splitlines()
              if line.strip() and start_step and json.loads(line).get('step', 0) <= start_step]
      atomic.write_text(path, ''.join(line + '\n' for line in keep))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')

  def last(self, key: str) -> dict:
    """The last row that has `key` ({} if none)."""
    rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
    return next((r for r in reversed(rows) if key in r), {})
