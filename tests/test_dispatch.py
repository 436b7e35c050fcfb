"""Dispatch implementations: each one against the compute-all oracle (outputs and gradients with respect to tokens,
gates and expert weights), einsum and gather dropping the same assignments, and the capacity priority rule."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax import config, dispatch
from slmjax.dispatch.experts import ExpertWeights, expert_ffn
from slmjax.dispatch.gather import expert_blocks
from slmjax.dispatch import einsum as einsum_module, gather as gather_module, grouped
from slmjax.dispatch.grouped import grouped_ffn
from slmjax.dispatch.ragged import sort_by_expert
from slmjax.dispatch.slots import capacity_slots
from slmjax.kernels import gemm

D, F = 16, 8


def _inputs(n_tokens, n_experts, top_k, activation='swiglu', seed=0, skew=0.0):
  """Tokens x_XD, gates_XA in (0.1, 1), distinct experts per token (expert 0 favoured by `skew`), expert weights.
  NumPy random numbers: eager jax.random calls would each compile a kernel."""
  rng = np.random.default_rng(seed)
  x_XD = rng.normal(size=(n_tokens, D)).astype(np.float32)
  scores_XE = rng.uniform(size=(n_tokens, n_experts))
  scores_XE[:, 0] += skew
  experts_XA = np.argsort(-scores_XE, axis=1)[:, :top_k].astype(np.int32)
  gates_XA = rng.uniform(0.1, 1.0, size=(n_tokens, top_k)).astype(np.float32)
  normal = lambda *shape: (rng.normal(size=shape) * shape[1] ** -0.5).astype(np.float32)
  w = ExpertWeights(normal(n_experts, D, F) if activation != 'gelu' else None, normal(n_experts, D, F),
                    normal(n_experts, F, D))
  return x_XD, gates_XA, experts_XA, w


@functools.lru_cache(maxsize=None)
def _loss_and_grads(name, group_size, capacity, activation):
  """Jitted (loss, kept, y, grads w.r.t. x, gates, weights) of one implementation; cached across tests."""
  def loss_fn(x_XD, gates_XA, w, experts_XA):
    X, A = experts_XA.shape
    G = X // group_size
    y_GSD, kept_GSA = dispatch.DISPATCH[name](
        x_XD.reshape(G, group_size, D), gates_XA.reshape(G, group_size, A), experts_XA.reshape(G, group_size, A),
        w, capacity, activation)
    return jnp.sum(jnp.sin(y_GSD) * jnp.cos(jnp.arange(D))), (y_GSD.reshape(X, D), kept_GSA.reshape(X, A))
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))


def _run(name, inputs, group_size, capacity, activation):
  x_XD, gates_XA, experts_XA, w = inputs
  (loss, (y_XD, kept_XA)), grads = _loss_and_grads(name, group_size, capacity, activation)(x_XD, gates_XA, w,
                                                                                          experts_XA)
  return y_XD, kept_XA, grads


def _assert_close_tree(got, want, tol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=tol, rtol=tol)


CASES = [  # (n_experts, top_k, group_size, activation)
    (4, 1, 16, 'geglu'), (8, 2, 8, 'gelu'), (64, 8, 32, 'swiglu')]


@pytest.mark.parametrize('name', ['einsum', 'gather', 'ragged'])
@pytest.mark.parametrize('n_experts, top_k, group_size, activation', CASES)
def test_matches_dense_oracle_when_nothing_drops(name, n_experts, top_k, group_size, activation):
  inputs = _inputs(64, n_experts, top_k, activation)
  y, kept, grads = _run(name, inputs, group_size, group_size, activation)  # capacity S: nothing can drop
  y_oracle, _, grads_oracle = _run('dense', inputs, group_size, group_size, activation)
  assert np.all(kept)
  np.testing.assert_allclose(y, y_oracle, atol=1e-5, rtol=1e-5)
  _assert_close_tree(grads, grads_oracle)


@pytest.mark.parametrize('name, module', [('einsum', einsum_module), ('gather', gather_module)])
@pytest.mark.parametrize('n_experts, top_k, group_size, activation', CASES)
def test_row_tiles_on_one_cpu_device_match_the_batched_products(name, module, n_experts, top_k, group_size,
                                                                activation, monkeypatch):
  """On one CPU device einsum and gather run their experts' FFNs as grouped_ffn's row tiles (einsum's full
  buffers; gather's kept rows packed by expert), on a mesh as batched products: the same outputs, kept set and
  gradients, with tokens dropped (capacity 3)."""
  inputs = _inputs(64, n_experts, top_k, activation, skew=0.5, seed=2)
  runs = []
  for tiles in (True, False):
    monkeypatch.setattr(module, 'row_tiles_pay', lambda rows, tiles=tiles: tiles)  # these few tokens too
    _loss_and_grads.cache_clear()
    runs.append(_run(name, inputs, group_size, 3, activation))
  _loss_and_grads.cache_clear()
  assert not np.all(runs[0][1])  # some assignments dropped
  _assert_close_tree(runs[0], runs[1])


@pytest.mark.parametrize('n_experts, top_k, group_size, capacity', [(8, 2, 16, 3), (64, 8, 64, 4)])
def test_einsum_and_gather_drop_the_same_assignments(n_experts, top_k, group_size, capacity):
  inputs = _inputs(64, n_experts, top_k, skew=0.5, seed=1)  # expert 0 is oversubscribed
  y_einsum, kept_einsum, grads_einsum = _run('einsum', inputs, group_size, capacity, 'swiglu')
  y_gather, kept_gather, grads_gather = _run('gather', inputs, group_size, capacity, 'swiglu')
  kept_einsum = np.asarray(kept_einsum)
  assert 0.05 < 1.0 - kept_einsum.mean() < 0.9, 'the case must actually drop, but not everything'
  np.testing.assert_array_equal(kept_gather, kept_einsum)
  np.testing.assert_allclose(y_gather, y_einsum, atol=1e-5, rtol=1e-5)
  _assert_close_tree(grads_gather, grads_einsum)
  # A dropped assignment contributes nothing: the oracle with those gates zeroed gives the same outputs.
  x_XD, gates_XA, experts_XA, w = inputs
  y_oracle, _, _ = _run('dense', (x_XD, gates_XA * kept_einsum, experts_XA, w), group_size, capacity, 'swiglu')
  np.testing.assert_allclose(y_gather, y_oracle, atol=1e-5, rtol=1e-5)


def test_capacity_priority_is_token_order():
  # One group of 3 tokens, top-2, 2 experts, capacity 2. First choices: [0, 0, 1], second choices: [1, 1, 0].
  experts_GSA = jnp.array([[[0, 1], [0, 1], [1, 0]]], jnp.int32)
  slot_GSA, kept_GSA = jax.jit(capacity_slots, static_argnums=(1, 2))(experts_GSA, 2, 2)
  # Tokens 0 and 1 fill both experts; token 2 comes last and finds no room (a choice-major rule would have
  # given its first choice expert 1's slot and evicted token 1's second choice: the future deciding the past).
  np.testing.assert_array_equal(slot_GSA[0], [[0, 0], [1, 1], [2, 2]])
  np.testing.assert_array_equal(kept_GSA[0], [[True, True], [True, True], [False, False]])


@pytest.mark.parametrize('skew, tail_bucket', [(0.0, 8), (0.1, 24), (0.3, 112), (5.0, 192)])
def test_gather_tail_buckets_do_not_change_the_result(skew, tail_bucket):
  # 256 tokens, 4 experts, top-1, one group of 64 per 64 tokens, capacity 64: blocks of 64 (balanced) + 192 rows.
  # Balanced routing runs the smallest tail bucket, skewed routing a larger one, all-to-one-expert all 192 rows.
  n_experts, top_k, group_size = 4, 1, 64
  x_XD, gates_XA, experts_XA, w = inputs = _inputs(256, n_experts, top_k, skew=skew, seed=2)
  blocks = expert_blocks(256, 64)
  assert blocks == ((64, (64,)), (192, (8, 16, 24, 32, 48, 72, 112, 168, 192)))  # steps of 8, then 1.5x
  n_rows = np.bincount(experts_XA.ravel(), minlength=n_experts).max()  # nothing drops: capacity = group size
  assert min(b for b in blocks[1][1] if b >= n_rows - 64) == tail_bucket
  y, _, grads = _run('gather', inputs, group_size, group_size, 'swiglu')
  y_oracle, _, grads_oracle = _run('dense', inputs, group_size, group_size, 'swiglu')
  np.testing.assert_allclose(y, y_oracle, atol=1e-5, rtol=1e-5)
  _assert_close_tree(grads, grads_oracle)


@pytest.mark.parametrize('rows, balanced', [(1280, 1024), (640, 512), (4096, 1024), (6, 8), (24, 5), (16, 32)])
def test_expert_blocks_cover_the_buffer_with_sorted_buckets(rows, balanced):
  blocks = expert_blocks(rows, balanced)
  assert sum(size for size, _ in blocks) == rows
  for size, buckets in blocks:
    assert buckets[-1] == size and list(buckets) == sorted(set(buckets)) and len(buckets) <= 17
  if len(blocks) == 2:  # a base block of the balanced load, always computed in full
    assert blocks[0] == (balanced // 8 * 8, (balanced // 8 * 8,))


def test_auto_resolves_to_the_default_for_the_capacity_rule():
  assert dispatch.default_dispatch() == 'gather'
  assert dispatch.default_dispatch(dropless=True) == 'ragged'  # same semantics as gather at capacity S
  assert dispatch.get_dispatch('auto') is dispatch.DISPATCH[dispatch.default_dispatch()]
  assert dispatch.get_dispatch('auto', dropless=True) is dispatch.DISPATCH['ragged']
  with pytest.raises(ValueError, match='not implemented'):
    dispatch.get_dispatch('magic')


def test_registry_names_are_the_config_choices():
  assert set(dispatch.DISPATCH) | {'auto'} == set(config.DISPATCHES)


@pytest.mark.parametrize('activation,tiles,matmul,in_place', [
    ('swiglu', (16, 8), 'xla', False), ('gelu', (16, 8), 'xla', False), ('swiglu', (32, 16, 8), 'xla', False),
    ('swiglu', (32, 16, 8), 'xla', True), ('gelu', (16, 8), 'xla', True), ('swiglu', (32, 16, 8), 'onednn', False),
    ('gelu', (16, 8), 'onednn', False)])
def test_grouped_ffn_tiles_match_per_expert_ffns(activation, tiles, matmul, in_place, tmp_path, monkeypatch):
  """Tiles of 32, 16 and 8 rows over runs of 0 to 37 rows: several tile sizes in one expert, partial tiles,
  empty experts, a large tile past its run's end (15 rows in 16), and a last tile past the buffer's end; outputs
  and every gradient equal each expert's FFN on its own rows, with XLA's dot and with oneDNN's GEMM (where the
  `onednn` extra is installed), and with dx written over dy in place (as for large buffers), where a tile past
  its run must leave the next expert's dy intact."""
  monkeypatch.setenv('SLMJAX_CACHE', str(tmp_path))  # a first build of the GEMM handlers goes here, not to ~
  monkeypatch.setattr(grouped, 'IN_PLACE_MIN_ELEMENTS', 0 if in_place else 1 << 62)
  if matmul in gemm.LIBRARIES and (reason := gemm.load(matmul)) is not None:
    pytest.skip(f'no {matmul} matmul here: {reason}')
  _, _, _, w = _inputs(4, 6, 1, activation, seed=3)
  sizes_E = np.array([37, 0, 8, 1, 16, 15], np.int32)
  rng = np.random.default_rng(4)
  x_ND, dy_ND = (rng.normal(size=(int(sizes_E.sum()), D)).astype(np.float32) for _ in range(2))

  def reference(x_ND, w):
    starts = np.concatenate([[0], np.cumsum(sizes_E)])
    return jnp.concatenate([expert_ffn(x_ND[None, lo:hi], ExpertWeights(
        *(None if a is None else a[e:e + 1] for a in w)), activation)[0]
        for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]))])

  def tiled(x_ND, w):  # rows from a shuffled source, with the 8 slack rows grouped_ffn asks for (dropped)
    N = len(x_ND)
    perm_N = np.random.default_rng(5).permutation(N)
    src_ND = x_ND[np.argsort(perm_N)]  # row n of the sorted layout is source row perm_N[n]
    row_src_N = jnp.asarray(np.concatenate([perm_N, np.full(8, N)]), jnp.int32)
    dest_N1 = jnp.asarray(np.argsort(perm_N)[:, None], jnp.int32)
    y_ND = grouped_ffn(src_ND, row_src_N, dest_N1, w, jnp.asarray(sizes_E), activation, tiles, matmul)[:N]
    return y_ND
  for fn in (tiled, reference):  # jitted: the reference's per-expert slices would compile op by op, 178 programs
    y_ND, grads = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(fn(x, w), dy_ND), argnums=(0, 1)))(x_ND, w)
    if fn is tiled:
      got = (y_ND, grads)
  _assert_close_tree(got, (y_ND, grads), tol=1e-4)


@pytest.mark.parametrize('in_place', [False, True])
def test_grouped_ffn_in_bf16_writes_tiles_in_place_and_matches_f32(in_place, monkeypatch):
  """bf16 rows and weights: outputs and gradients (weight gradients summed over tiles in f32) within bf16
  rounding of the f32 run, and no tile write in the compiled program runs in f32 (XLA:CPU's bf16
  normalization would convert the whole buffer around each one), nor any read of the weights or residuals (an f32
  copy of the whole operand, hoisted out of the loop); also with dx written over dy's bits."""
  monkeypatch.setattr(grouped, 'IN_PLACE_MIN_ELEMENTS', 0 if in_place else 1 << 62)
  _, _, _, w = _inputs(4, 6, 1, 'swiglu', seed=3)
  sizes_E = np.array([37, 0, 8, 1, 16, 15], np.int32)
  x_ND = np.random.default_rng(4).normal(size=(int(sizes_E.sum()) + 8, D)).astype(np.float32)

  N = int(sizes_E.sum())
  rows = (jnp.arange(N + 8, dtype=jnp.int32), jnp.arange(N + 8, dtype=jnp.int32)[:, None])  # source row = row

  def loss(x, w):
    return jnp.sum(grouped_ffn(x, *rows, w, jnp.asarray(sizes_E), 'swiglu', (16, 8))[:-8].astype(jnp.float32) ** 2)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want = grad(x_ND, w)
  to_bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
  got = grad(*to_bf16((x_ND, w)))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got[1]))
  for g, f in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(f)))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(f) / scale, atol=0.03)
  hlo = grad.lower(*to_bf16((x_ND, w))).compile().as_text()
  assert 'dynamic-update-slice(' in hlo or 'dynamic-update-slice_' in hlo
  assert not re.search(r'= f32\[[0-9,]+\]\S* dynamic-update-slice\(', hlo)
  # Reads on bits too: no f32 copy of every expert's weights, nor of the gate / up residuals (F = 8 wide).
  assert not re.search(rf'= f32\[{len(sizes_E)},\d+,\d+\]', hlo)
  assert not re.search(rf'= f32\[{N + 8},{F}\]', hlo)


@pytest.mark.parametrize('n, n_experts', [(4096, 8), (1 << 16, (1 << 15) + 1)])  # packed key; two-operand sort
def test_sort_by_expert_is_a_stable_sort(n, n_experts):
  """Both ways (the packed int32 key, and the two-operand sort where expert * N would overflow it) give numpy's
  stable order, the sorted experts and the per-expert counts."""
  experts_N = np.random.default_rng(0).integers(0, min(n_experts, 64), n).astype(np.int32)
  sorted_N, asg_N, sizes_E = jax.jit(sort_by_expert, static_argnums=1)(jnp.asarray(experts_N), n_experts)
  order_N = np.argsort(experts_N, kind='stable')
  np.testing.assert_array_equal(asg_N, order_N)
  np.testing.assert_array_equal(sorted_N, experts_N[order_N])
  np.testing.assert_array_equal(sizes_E, np.bincount(experts_N, minlength=n_experts))
