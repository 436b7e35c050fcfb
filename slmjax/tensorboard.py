"""TensorBoard event files of a run (`<run>/tensorboard/`), written with tensorboardX.

tensorboardX writes the standard event format with no TensorFlow or PyTorch (it needs numpy and protobuf, which
orbax already brings). One TensorBoard run per training run, so `tensorboard --logdir=<sweep out>` shows every
point of a sweep side by side. Each metrics row becomes scalars under train/, eval/, optim/, router/ and speed/;
on resume, events past the restored step are purged (tensorboardX's `purge_step`), as metrics.jsonl is trimmed.
"""

from __future__ import annotations

import os

import tensorboardX

TAGS = {  # metrics.jsonl key -> TensorBoard tag
    'train_loss': 'train/loss', 'train_total_loss': 'train/total_loss', 'eval_loss': 'eval/loss',
    'eval_bpb': 'eval/bits_per_byte', 'lr': 'optim/lr', 'grad_norm': 'optim/grad_norm',
    'aux_loss': 'router/aux_loss', 'lb_loss': 'router/lb_loss', 'z_loss': 'router/z_loss',
    'drop_fraction': 'router/drop_fraction', 'router_entropy': 'router/entropy',
    'expert_load_max_over_mean': 'router/expert_load_max_over_mean',
    'selection_bias_spread': 'router/selection_bias_spread',
    'tokens_per_s': 'speed/tokens_per_s', 'step_time_s': 'speed/step_time_s',
}


class TensorBoardLog:
  """Scalars of metrics rows into event files under `directory` (nothing when disabled)."""

  def __init__(self, directory: str | os.PathLike, start_step: int, enabled: bool = True):
    self.writer = tensorboardX.SummaryWriter(str(directory), purge_step=start_step or None) if enabled else None

  def write(self, row: dict) -> None:
    if self.writer is None:
      return
    for key, tag in TAGS.items():
      if key in row:
        self.writer.add_scalar(tag, row[key], global_step=row['step'])

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
