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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's clipping (gradients untouched below `max_norm`, scaled to it above), as one
  scalar factor: optax divides every element by the norm, and XLA then writes the clipped gradients out in a pass
  of their own, where a product by a scalar fuses into Adam's moment updates. The optimizer update of 12.6M
  parameters (AdamW, 2-core CPU): 14.8 -> 10.6 ms; values equal to optax's within an ulp when clipping."""
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  clip = clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(clip, optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                       mask=decay_mask))
