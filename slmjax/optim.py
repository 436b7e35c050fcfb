"""The optimizer: AdamW with a warmup/cosine or warmup-stable-decay schedule, global-norm clipping, decay on
matrices only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from slmjax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The learning rate at each step: `cosine` or `wsd` (`cfg.schedule`)."""
  if cfg.schedule == 'wsd':
    return wsd_schedule(cfg.lr, cfg.warmup, cfg.steps - cfg.decay_steps(), cfg.decay_steps(),
                        cfg.lr * cfg.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * cfg.min_lr_ratio)


def wsd_schedule(peak: float, warmup: int, decay_start: int, decay_steps: int, final: float) -> optax.Schedule:
  """Warmup-stable-decay (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations"): linear warmup from 0 to `peak` over `warmup` steps, `peak` held until `decay_start`, then the
  paper's best cooldown shape, 1 - sqrt, from `peak` to `final` over `decay_steps` steps.

  Before `decay_start` the value depends only on `peak` and `warmup`, never on the run's length: every branch of
  a run (and the run continued to a larger --steps) shares the stable trunk's steps exactly."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    done = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
    cool = final + (peak - final) * (1.0 - jnp.sqrt(done))
    return jnp.where(step < warmup, warm, cool)
  return schedule


def decay_mask(params):
  """Weight decay on matrices and embeddings only: 1-D parameters are norm gains and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(clip, optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                       mask=decay_mask))
