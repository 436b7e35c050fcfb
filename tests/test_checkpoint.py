"""Orbax checkpoints: exact round trip of model state, optimizer state and data state; retention; atomicity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slmjax import checkpoint


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
