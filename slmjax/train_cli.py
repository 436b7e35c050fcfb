"""Training flags shared by experiments/train.py and the sweep, and the TrainConfig they describe.

Architecture flags (and `--seq_len`) come from `slmjax.cli.define_model_flags()`; call both definers at import.
"""

from __future__ import annotations

import math

from absl import flags

from slmjax.train import TrainConfig

FLAGS = flags.FLAGS


def define_train_flags() -> None:
  """Define the training flags (idempotent, so scripts importing each other do not clash)."""
  if 'steps' in FLAGS:
    return
  d = TrainConfig()
  flags.DEFINE_integer('steps', d.steps, 'Optimizer steps (or give --tokens).')
  flags.DEFINE_integer('tokens', None, 'Token budget instead of --steps: steps = ceil(tokens / (batch * seq_len)).')
  flags.DEFINE_integer('batch_size', d.batch_size, 'Sequences per step (global, over all processes).')
  flags.DEFINE_float('lr', d.lr, 'Peak learning rate (AdamW).')
  flags.DEFINE_integer('warmup', d.warmup, 'Linear warmup steps, then cosine decay to lr * min_lr_ratio.')
  flags.DEFINE_float('min_lr_ratio', d.min_lr_ratio, 'Final learning rate as a fraction of --lr.')
  flags.DEFINE_float('weight_decay', d.weight_decay, 'Decoupled weight decay on matrices (not norms or biases).')
  flags.DEFINE_float('grad_clip', d.grad_clip, 'Clip the global gradient norm to this; 0 = no clipping.')
  flags.DEFINE_string('data', d.data, 'stdlib | stdlib-full | tinystories | tinystories-valid | a path, directory '
                      'or glob of text files or of .npy/.bin token files.')
  flags.DEFINE_float('eval_fraction', d.eval_fraction, 'Fraction of documents held out for evaluation.')
  flags.DEFINE_integer('seed', d.seed, 'Seed of the initialisation and the data order.')
  flags.DEFINE_integer('eval_every', d.eval_every, 'Held-out evaluation every n steps (0 = at the end only).')
  flags.DEFINE_integer('eval_batches', d.eval_batches, 'Batches in the (fixed) held-out evaluation.')
  flags.DEFINE_integer('checkpoint_every', d.checkpoint_every, 'Checkpoint every n steps (0 = at the end only).')
  flags.DEFINE_integer('keep_checkpoints', d.keep_checkpoints, 'Checkpoints kept on disk.')
  flags.DEFINE_integer('log_every', d.log_every, 'Write a metrics line every n steps.')


def train_config_from_flags(**overrides) -> TrainConfig:
  """Build and validate the TrainConfig the flags describe (raises ValueError on nonsense).

  `overrides` replace flag values before validation (the sweep sets steps and warmup per ladder point).
  """
  f = FLAGS
  steps = f.steps
  if f.tokens is not None:
    if f['steps'].present:
      raise ValueError('give --steps or --tokens, not both')
    if f.tokens <= 0 or f.batch_size <= 0 or f.seq_len <= 0:
      raise ValueError(f'--tokens={f.tokens}, --batch_size={f.batch_size} and --seq_len={f.seq_len} must be positive')
    steps = math.ceil(f.tokens / (f.batch_size * f.seq_len))
  values = dict(
      steps=steps, batch_size=f.batch_size, seq_len=f.seq_len, lr=f.lr, warmup=f.warmup,
      min_lr_ratio=f.min_lr_ratio, weight_decay=f.weight_decay, grad_clip=f.grad_clip, data=f.data,
      eval_fraction=f.eval_fraction, seed=f.seed, eval_every=f.eval_every, eval_batches=f.eval_batches,
      checkpoint_every=f.checkpoint_every, keep_checkpoints=f.keep_checkpoints, log_every=f.log_every)
  return TrainConfig(**{**values, **overrides})
