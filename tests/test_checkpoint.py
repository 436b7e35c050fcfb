"""Orbax checkpoints: exact round trip of model state, optimizer state and data state; retention; atomicity;
checkpoints saved with legacy parameter names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slmjax import checkpoint
from slmjax.config import ModelConfig
from slmjax.model import abstract_model, create_model


def tiny_state():
  """An nnx.State shaped like a model's (nested modules, Params and a non-Param variable) and its AdamW state."""
  state = nnx.State({'blocks': {0: {'w_DF': nnx.Param(jnp.arange(6.0).reshape(2, 3))}},
                     'scale': nnx.Param(jnp.ones(3)), 'count': nnx.Variable(jnp.zeros((), jnp.int32))})
  tx = optax.adamw(1e-3)
  opt_state = tx.init(nnx.split_state(state, nnx.Param, ...)[0])
  return None, state, opt_state


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
  _, state, opt_state = tiny_state()
  state = jax.tree.map(lambda x: x + 3, state)  # not the initial values
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)
  with checkpoint.Checkpointer(tmp_path / 'ck') as ck:
    assert ck.latest_step() is None
    ck.save(7, state, opt_state, {'next_index': 42}, {'tokens': 99})
  _, fresh_state, fresh_opt = tiny_state()
  with checkpoint.Checkpointer(tmp_path / 'ck') as ck:
    assert ck.latest_step() == 7
    got_state, got_opt, data_state, meta = ck.restore(7, fresh_state, fresh_opt)
  assert_trees_equal(got_state, state)
  assert_trees_equal(got_opt, opt_state)
  assert data_state == {'next_index': 42} and meta == {'tokens': 99, 'step': 7}
  assert type(got_state) is type(state)


def test_keeps_the_last_n_and_ignores_unfinished_saves(tmp_path):
  _, state, opt_state = tiny_state()
  with checkpoint.Checkpointer(tmp_path / 'ck', keep=2) as ck:
    for step in (10, 20, 30):
      ck.save(step, state, opt_state, {'next_index': step}, {})
    assert ck.all_steps() == [20, 30]
  # A save killed half-way leaves a temporary directory: it is not a checkpoint, and saving again works.
  (tmp_path / 'ck' / '40.orbax-checkpoint-tmp-123').mkdir()
  (tmp_path / 'ck' / '40.orbax-checkpoint-tmp-123' / 'partial').write_text('x')
  assert checkpoint.latest_step(tmp_path / 'ck') == 30
  with checkpoint.Checkpointer(tmp_path / 'ck', keep=2) as ck:
    assert ck.latest_step() == 30 and ck.all_steps() == [20, 30]
    ck.save(40, state, opt_state, {'next_index': 40}, {})
    assert ck.all_steps() == [30, 40]
  assert checkpoint.latest_step(tmp_path / 'nothing') is None


LEGACY_CFGS = {
    'gqa': ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=64, norm='layernorm',
                       qkv_bias=True, qk_norm='full', n_experts=2, top_k=2, router='sigmoid', router_bias=True),
    'mla': ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=64, attention='mla', q_lora_rank=8),
    'mla-full-rank-query': ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=64, attention='mla'),
}


def model_and_opt_state(cfg, seed):
  """A real model's state and AdamW state, moved away from their initial values (seed-dependent)."""
  state = nnx.state(create_model(cfg, seed=seed))
  opt_state = optax.adamw(1e-3).init(nnx.split_state(state, nnx.Param, ...)[0])
  shift = lambda x: x + seed + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x + seed  # noqa: E731
  return jax.tree.map(shift, state), jax.tree.map(shift, opt_state)


def legacy_copy(tree):
  """A pure-dict copy of a pytree with today's parameter names turned back into LEGACY_NAMES' old ones."""
  old_of = {new: old for old, new in checkpoint.LEGACY_NAMES.items()}
  copy = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    *parents, last = (old_of.get(k, k) for k in map(checkpoint.path_key, path))
    node = copy
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return copy


def test_legacy_names_are_todays_attributes():
  names = {checkpoint.path_key(p) for cfg in LEGACY_CFGS.values()
           for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(abstract_model(cfg)))[0] for p in path}
  assert set(checkpoint.LEGACY_NAMES.values()) <= names
  assert not set(checkpoint.LEGACY_NAMES) & names


@pytest.mark.parametrize('name', LEGACY_CFGS)
def test_checkpoint_with_legacy_names_restores_into_the_new_structure(tmp_path, name):
  state, opt_state = model_and_opt_state(LEGACY_CFGS[name], seed=1)
  legacy_model, legacy_opt = legacy_copy(state), legacy_copy(opt_state)
  assert 'scale_D' in str(legacy_model) and 'scale_D' in str(legacy_opt)
  with checkpoint.Checkpointer(tmp_path / 'ck') as ck:
    ck.save(3, legacy_model, legacy_opt, {'next_index': 5}, {'tokens': 7})
  fresh_state, fresh_opt = model_and_opt_state(LEGACY_CFGS[name], seed=2)
  with checkpoint.Checkpointer(tmp_path / 'ck') as ck:
    assert ck.has_legacy_names(3)
    got_state, got_opt, data_state, meta = ck.restore(3, fresh_state, fresh_opt)
  assert_trees_equal(got_state, state)
  assert_trees_equal(got_opt, opt_state)
  for got, like in zip(jax.tree.leaves(got_state) + jax.tree.leaves(got_opt),
                       jax.tree.leaves(fresh_state) + jax.tree.leaves(fresh_opt)):
    assert got.dtype == like.dtype and got.sharding == like.sharding
  assert type(got_state) is type(state) and data_state == {'next_index': 5} and meta == {'tokens': 7, 'step': 3}


def test_legacy_checkpoint_that_does_not_match_is_a_one_line_error(tmp_path):
  state, opt_state = model_and_opt_state(LEGACY_CFGS['mla'], seed=1)
  legacy_model = legacy_copy(state)
  del legacy_model['final_norm']
  with checkpoint.Checkpointer(tmp_path / 'ck') as ck:
    ck.save(1, legacy_model, legacy_copy(opt_state), {}, {})
    with pytest.raises(ValueError, match='for model/final_norm/scale/value') as info:
      ck.restore(1, state, opt_state)
  assert '\n' not in str(info.value)
