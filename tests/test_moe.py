"""The routed expert FFN: einsum dispatch vs the compute-all oracle, capacity drops, one expert == dense FFN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.layers import DenseFFN
from slmjax.moe import MoEFFN


@nnx.jit  # one compile, not one per op (eager, a 64-expert forward alone took 10 s)
def _forward(layer, x_BTD):
  return layer(x_BTD)


@nnx.jit  # one compile, not one per op (eager, the oracle comparison took 15 s a case)
def _moe_loss_and_grads(layer, x_BTD):
  def loss_fn(layer, x_BTD):
    y_BTD, extras = layer(x_BTD)
    return jnp.sum(jnp.sin(y_BTD)) + extras['lb_loss'] + extras['z_loss']
  return nnx.value_and_grad(loss_fn, argnums=(0, 1))(layer, x_BTD)


@pytest.mark.parametrize('n_experts, top_k, group_size', [(4, 1, 16), (8, 2, 32), (8, 2, 7), (64, 8, 64)])
def test_einsum_dispatch_equals_oracle_when_nothing_drops(n_experts, top_k, group_size):
  cfg = ModelConfig(d_model=32, n_heads=2, n_experts=n_experts, top_k=top_k, d_expert=16, capacity_factor=None,
                    group_size=group_size, dispatch='einsum')
  layer = MoEFFN(cfg, nnx.Rngs(params=0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 32, 32))
  loss, (grads, grad_x) = _moe_loss_and_grads(layer, x_BTD)
  oracle = MoEFFN(cfg.replace(dispatch='dense'), nnx.Rngs(params=0))
  oracle_loss, (oracle_grads, oracle_grad_x) = _moe_loss_and_grads(oracle, x_BTD)
  np.testing.assert_allclose(loss, oracle_loss, rtol=1e-5)
  np.testing.assert_allclose(grad_x, oracle_grad_x, atol=1e-5, rtol=1e-5)
  for name in ('w_router_DE', 'w_gate_EDF', 'w_up_EDF', 'w_down_EFD'):
    np.testing.assert_allclose(getattr(grads, name)[...], getattr(oracle_grads, name)[...], atol=1e-5, rtol=1e-5)
  y_BTD, extras = _forward(layer, x_BTD)
  assert float(extras['drop_fraction']) == 0.0


def test_low_capacity_drops_match_hand_count_and_dropped_tokens_get_zero():
  # A zero router gives every expert the same probability; top_k breaks ties to expert 0, so all 8 tokens of a
  # group want expert 0 and capacity = ceil(1.0 * 8 * 1 / 4) = 2 keeps exactly the first two of each group.
  cfg = ModelConfig(d_model=16, n_heads=2, n_experts=4, top_k=1, d_expert=8, capacity_factor=1.0, group_size=8,
                    dispatch='einsum')
  layer = MoEFFN(cfg, nnx.Rngs(params=0))
  layer.w_router_DE[...] = jnp.zeros_like(layer.w_router_DE[...])
  x_BTD = jax.random.normal(jax.random.key(2), (2, 16, 16))
  y_BTD, extras = _forward(layer, x_BTD)
  assert float(extras['drop_fraction']) == pytest.approx(6 / 8)
  np.testing.assert_allclose(extras['expert_load'], [1.0, 0.0, 0.0, 0.0])
  y_GSD = np.asarray(y_BTD).reshape(4, 8, 16)
  assert np.all(np.abs(y_GSD[:, :2]).sum(-1) > 0), 'the two tokens that fit are computed'
  np.testing.assert_array_equal(y_GSD[:, 2:], 0.0)


@pytest.mark.parametrize('activation', ['swiglu', 'gelu'])
def test_one_expert_top1_equals_dense_ffn(activation):
  cfg = ModelConfig(d_model=16, n_heads=2, d_ff=32, activation=activation)
  dense = DenseFFN(cfg, cfg.ffn_size, nnx.Rngs(params=0))
  moe_cfg = cfg.replace(n_experts=1, top_k=1, d_expert=32, capacity_factor=None, group_size=16)
  layer = MoEFFN(moe_cfg, nnx.Rngs(params=1))
  for name in ('w_gate', 'w_up'):
    if hasattr(dense, f'{name}_DF'):
      getattr(layer, f'{name}_EDF')[...] = getattr(dense, f'{name}_DF')[...][None]
  layer.w_down_EFD[...] = dense.w_down_FD[...][None]
  x_BTD = jax.random.normal(jax.random.key(3), (2, 8, 16))
  y_BTD, _ = _forward(layer, x_BTD)
  np.testing.assert_allclose(y_BTD, nnx.jit(lambda f, x: f(x))(dense, x_BTD), atol=1e-6, rtol=1e-5)
