"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax

from slmjax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices and embeddings only: 1-D parameters are norm gains and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(clip, optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                       mask=decay_mask))
