"""The optimizer's own global-norm clipping against optax's, and decay on matrices only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slmjax import optim
from slmjax.config import TrainConfig
from own_kernels import built_in_temp_cache


@pytest.fixture(scope='module')
def adamw_built(tmp_path_factory):
  yield from built_in_temp_cache(tmp_path_factory, optim.fused_adamw.load, 'AdamW call')


def _grads(scale):
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(rng.standard_normal((64, 32)) * scale, jnp.float32),
          'b': jnp.asarray(rng.standard_normal((32,)) * scale, jnp.float32),
          'c': jnp.asarray(rng.standard_normal((5, 7)) * scale, jnp.float32),  # a vector's floats and a tail
          'd': jnp.asarray(rng.standard_normal((300, 250)) * scale, jnp.float32)}  # over one task of the call


@pytest.mark.parametrize('scale', [1e-3, 10.0])  # global norm ~0.05 (untouched) and ~450 (clipped to 1)
def test_clip_by_global_norm_matches_optax(scale):
  grads = _grads(scale)
  ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for k in grads:
    if scale < 1:  # below the limit the gradients pass bit for bit
      np.testing.assert_array_equal(ours[k], grads[k])
    np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-7, atol=0)
  assert float(optax.tree.norm(ours)) == pytest.approx(min(1.0, float(optax.tree.norm(grads))), rel=1e-6)


def test_make_optimizer_clips_and_decays_matrices_only():
  cfg = TrainConfig(steps=10, warmup=0, lr=1.0, weight_decay=0.5, grad_clip=1.0)
  tx = optim.make_optimizer(cfg)
  params = {'w': jnp.ones((4, 4)), 'b': jnp.ones((4,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.max(jnp.abs(updates['b']))) == 0.0  # no gradient, no decay on a 1-D parameter
  assert float(updates['w'][0, 0]) < 0  # decay pulls a matrix towards zero
  huge = jax.tree.map(lambda p: 1e6 * p, params)  # global norm 4.5e6, clipped to 1 before Adam's moments
  _, state = tx.update(huge, tx.init(params), params)
  mu = optax.tree.get(state, 'mu')
  np.testing.assert_allclose(optax.tree.norm(mu), (1 - cfg.b1) * 1.0, rtol=1e-5)


def _steps(cfg, params, grads_of, n, fused):
  """n optimizer steps (update_params), the fused call ruled out or not; gradients from grads_of(step)."""
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  if not fused:
    tx = optax.GradientTransformation(tx.init, tx.update)  # not make_optimizer's AdamW: optax's path
  step = jax.jit(lambda g, s, p: optim.update_params(tx, g, s, p))
  for i in range(n):
    params, state = step(grads_of(i), state, params)
  return params, state


@pytest.mark.parametrize('min_elements', [0, 10 ** 9])  # every parameter a call / every one in XLA
@pytest.mark.parametrize('schedule, clip_scale', [('cosine', 1e-3), ('wsd', 10.0)])  # unclipped / clipped
def test_fused_step_matches_optax(schedule, clip_scale, min_elements, monkeypatch, adamw_built):
  """The one-pass AdamW step (a call, or its arithmetic in XLA for small parameters) against optax's chain over
  five steps: same parameters, moments and counts (within an ulp or so: XLA may order a small array's operations
  differently), decay on matrices only."""
  monkeypatch.setattr(optim.fused_adamw, 'MIN_ELEMENTS', min_elements)
  cfg = TrainConfig(steps=20, warmup=2, lr=1e-2, weight_decay=0.1, grad_clip=1.0, schedule=schedule)
  params = jax.tree.map(lambda g: g * 30.0 + 0.5, _grads(1.0))
  grads_of = lambda i: jax.tree.map(lambda g: g * (1 + i), _grads(clip_scale))
  fused, fused_state = _steps(cfg, params, grads_of, 5, fused=True)
  plain, plain_state = _steps(cfg, params, grads_of, 5, fused=False)
  assert optim.fused_adamw.fits(*jax.tree.leaves(params))
  tx = optim.make_optimizer(cfg)
  lowered = jax.jit(lambda g, s, p: optim.update_params(tx, g, s, p)).lower(grads_of(0), tx.init(params), params)
  assert lowered.as_text().count('slmjax_adamw') == (4 if min_elements == 0 else 0)  # each parameter a call, or none
  for got, want in zip(jax.tree.leaves((fused, fused_state)), jax.tree.leaves((plain, plain_state))):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8)
  assert not np.allclose(fused['w'], params['w'])  # the step moved the parameters


def test_fused_step_only_for_f32_on_one_cpu_device(adamw_built):
  assert not optim.fused_adamw.fits(jnp.zeros(4, jnp.bfloat16))
  assert optim.fused_adamw.fits(jnp.zeros(4, jnp.float32)) == (optim.fused_adamw.load() is None)
