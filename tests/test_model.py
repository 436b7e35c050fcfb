"""Whole-model properties: causality, dense == one-expert MoE, finite jitted gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.model import create_model

DENSE = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
MOE = DENSE.replace(n_experts=4, top_k=2, d_expert=32, group_size=16)


@pytest.mark.parametrize('cfg', [DENSE, MOE], ids=['dense', 'moe'])
def test_causality_through_gradients(cfg):
  model = create_model(cfg, seed=0)
  x_BTD = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
  t = 5

  @nnx.jit  # one compiled program: run eagerly, each op compiled on its own (260 programs, 17 s here)
  def grad_of_logit_at_t(model, x_BTD):
    return jax.grad(lambda x_BTD: jnp.sum(model.forward_embeddings(x_BTD)[0][:, t]))(x_BTD)

  grad_BTD = grad_of_logit_at_t(model, x_BTD)
  np.testing.assert_array_equal(grad_BTD[:, t + 1:], 0.0)
  assert np.abs(grad_BTD[:, :t + 1]).sum() > 0


@pytest.mark.parametrize('dispatch', ['einsum', 'gather'])
def test_causal_even_when_tokens_drop(dispatch):
  # Capacity 0.5 drops many assignments; changing only the last tokens must not change any earlier logit,
  # through attention or through which earlier tokens won an expert slot.
  cfg = MOE.replace(capacity_factor=0.5, group_size=16, dispatch=dispatch)
  model = create_model(cfg, seed=0)
  tokens_BT = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
  changed_BT = tokens_BT.at[:, 12:].set((tokens_BT[:, 12:] + 7) % cfg.vocab_size)
  forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))
  logits_BTV, extras = forward(model, tokens_BT)
  assert float(extras['drop_fraction']) > 0.1
  np.testing.assert_array_equal(forward(model, changed_BT)[0][:, :12], logits_BTV[:, :12])


def test_one_expert_moe_model_equals_dense_model():
  dense = create_model(DENSE, seed=0)
  moe_cfg = DENSE.replace(n_experts=1, top_k=1, d_expert=DENSE.ffn_size, capacity_factor=None)
  moe = create_model(moe_cfg, seed=1)
  moe.embed_VD[...] = dense.embed_VD[...]
  moe.final_norm.scale[...] = dense.final_norm.scale[...]
  for moe_block, dense_block in zip(moe.blocks, dense.blocks):
    nnx.update(moe_block.attn, nnx.state(dense_block.attn))
    nnx.update(moe_block.attn_norm, nnx.state(dense_block.attn_norm))
    nnx.update(moe_block.ffn_norm, nnx.state(dense_block.ffn_norm))
    moe_block.ffn.w_gate_EDF[...] = dense_block.ffn.w_gate_DF[...][None]
    moe_block.ffn.w_up_EDF[...] = dense_block.ffn.w_up_DF[...][None]
    moe_block.ffn.w_down_EFD[...] = dense_block.ffn.w_down_FD[...][None]
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 16), 0, DENSE.vocab_size)
  forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT)[0])
  np.testing.assert_allclose(forward(moe, tokens_BT), forward(dense, tokens_BT), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cfg', [DENSE, MOE, MOE.replace(tie_embeddings=False, n_shared_experts=1, moe_every=2)],
                         ids=['dense', 'moe', 'moe-shared-untied'])
def test_jitted_loss_and_gradients_are_finite(cfg):
  model = create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  tokens_BT = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)

  @jax.jit
  def loss_fn(params):
    logits_BTV, extras = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), tokens_BT[:, 1:, None], -1)
    return jnp.mean(nll) + extras['aux_loss']

  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert np.isfinite(float(loss))
  # An untrained byte model predicts close to uniform: loss near log(256).
  assert abs(float(loss) - np.log(cfg.vocab_size)) < 0.5
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_moe_extras_report_every_moe_layer():
  cfg = MOE.replace(n_layers=4, moe_every=2)
  _, extras = nnx.jit(lambda model, tokens_BT: model(tokens_BT))(create_model(cfg), jnp.zeros((1, 16), jnp.int32))
  assert len(extras['moe_layers']) == 2
  for layer in extras['moe_layers']:
    assert layer['expert_load'].shape == (4,)
    np.testing.assert_allclose(float(layer['expert_load'].sum()), 1.0, rtol=1e-6)
    assert 0.0 <= float(layer['drop_fraction']) <= 1.0
  expected = cfg.lb_loss_weight * extras['lb_loss'] + cfg.z_loss_weight * extras['z_loss']
  np.testing.assert_allclose(extras['aux_loss'], expected, rtol=1e-6)


def test_too_long_sequence_is_rejected():
  with pytest.raises(ValueError, match='exceeds max_seq_len=16'):
    create_model(DENSE)(jnp.zeros((1, 17), jnp.int32))
