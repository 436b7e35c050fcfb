"""The fused SwiGLU calls (slmjax/kernels/swiglu_ffn.py and .cc, slmjax/dispatch/fused_swiglu.py): the same
values and gradients as each expert's FFN on its own rows, and as XLA's dense FFN, taken only where they run, the
row tiles or XLA's dots elsewhere."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from slmjax.config import ModelConfig
from slmjax.dispatch import fused_swiglu, grouped
from slmjax.dispatch.experts import ExpertWeights, expert_ffn
from slmjax.dispatch.ragged import ragged_dispatch
from slmjax.kernels import swiglu_ffn as kernel
from slmjax.layers import DenseFFN
from own_kernels import built_in_temp_cache

D, F = 32, 64


@pytest.fixture(scope='module', autouse=True)
def built(tmp_path_factory):
  yield from built_in_temp_cache(tmp_path_factory, kernel.load, 'fused SwiGLU call')


@pytest.fixture(autouse=True)
def f32_calls_taken(monkeypatch):
  """The f32 calls taken on any CPU, so their numerics are tested on AVX2 ones too (`auto` takes them only with
  AVX-512: kernel.F32_PAYS)."""
  monkeypatch.setattr(kernel, 'F32_PAYS', True)


def test_without_avx512_f32_layers_keep_xlas_dots(monkeypatch):
  monkeypatch.setattr(kernel, 'F32_PAYS', False)
  w = _weights(2)
  assert not fused_swiglu.runs(jnp.zeros((16, D)), w, 'swiglu', 'auto')
  assert kernel.dense_parts(jnp.zeros((512, D)), w.w_gate_EDF[0], w.w_up_EDF[0], w.w_down_EFD[0], 'auto') == 0
  w16 = ExpertWeights(*(a.astype(jnp.bfloat16) for a in w))
  assert fused_swiglu.runs(jnp.zeros((16, D), jnp.bfloat16), w16, 'swiglu', 'auto') == bf16_here()


def bf16_here() -> bool:
  """Whether this CPU's build has the bf16 handlers (AVX512_BF16); asked once the fixture has loaded them."""
  return {'fwd_bf16', 'bwd_bf16'} <= kernel._targets


def test_loads_again_after_its_cache_is_cleared():
  """A second load in one process (another cache, another copy of the library) registers nothing twice."""
  kernel.load.cache_clear()
  assert kernel.load() is None


def _weights(E, seed=0, dtype=np.float32, d=D, f=F):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.normal(size=shape) * shape[1] ** -0.5).astype(dtype)
  return ExpertWeights(normal(E, d, f), normal(E, d, f), normal(E, f, d))


WIDTHS = [(D, F), (kernel.MAX_D_MODEL, kernel.MAX_WIDTH)]  # (d_model, width): small, and the widest taken


@pytest.mark.parametrize('d, f', WIDTHS)
def test_matches_per_expert_ffns_values_and_gradients(d, f):
  """Runs of 0 to 130 rows (an empty expert, one of a single row, one over two 64-row blocks, runs not a multiple
  of the block or of the product kernel's 8 rows), rows
  gathered from a shuffled source, slack rows past the runs (zero out, their cotangent ignored): the output and
  the gradients of x and of every weight equal each expert's FFN on its own rows."""
  w = _weights(6, d=d, f=f)
  sizes_E = np.array([45, 0, 8, 1, 130, 17], np.int32)
  N = int(sizes_E.sum())
  rng = np.random.default_rng(4)
  x_ND, dy_ND = (rng.normal(size=(N, d)).astype(np.float32) for _ in range(2))
  perm_N = rng.permutation(N)

  def reference(x_ND, w):
    starts = np.concatenate([[0], np.cumsum(sizes_E)])
    return jnp.concatenate([expert_ffn(x_ND[None, lo:hi], ExpertWeights(*(a[e:e + 1] for a in w)), 'swiglu')[0]
                            for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]))])

  def fused(x_ND, w):
    src_ND = x_ND[np.argsort(perm_N)]  # row n of the sorted layout is source row perm_N[n]
    row_src_N = jnp.asarray(np.concatenate([perm_N, np.full(8, N)]), jnp.int32)
    dest_N1 = jnp.asarray(np.argsort(perm_N)[:, None], jnp.int32)
    return fused_swiglu.swiglu_ffn(src_ND, row_src_N, dest_N1, w, jnp.asarray(sizes_E))

  np.testing.assert_array_equal(fused(x_ND, w)[N:], 0)

  results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(fn(x, w)[:N], dy_ND), argnums=(0, 1)))(x_ND, w)
             for fn in (fused, reference)]  # jitted: eagerly, the reference compiles op by op (164 programs)
  for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_dropless_dispatch_takes_the_call_with_the_same_result_as_the_tiles(monkeypatch):
  """The ragged dispatch of an f32 SwiGLU layer of width 32 runs the fused call (its custom call is in the
  compiled program); with the call ruled out it runs the row tiles, and both give the same output and
  gradients."""
  rng = np.random.default_rng(1)
  E, A, X = 8, 2, 256
  w = _weights(E, seed=2)
  x_GSD = rng.normal(size=(1, X, D)).astype(np.float32)
  experts_GSA = np.argsort(-rng.uniform(size=(1, X, E)), axis=-1)[..., :A].astype(np.int32)
  gates_GSA = rng.uniform(0.1, 1.0, size=(1, X, A)).astype(np.float32)

  def loss(x, gates, w):
    y, _ = ragged_dispatch(x, gates, experts_GSA, w, 0, 'swiglu', 'auto')
    return jnp.sum(jnp.sin(y))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  assert 'slmjax_swiglu_ffn_fwd' in grad.lower(x_GSD, gates_GSA, w).as_text()
  fused = grad(x_GSD, gates_GSA, w)
  monkeypatch.setattr(fused_swiglu, 'runs', lambda *args: False)
  tiles_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  assert 'slmjax_swiglu_ffn_fwd' not in tiles_grad.lower(x_GSD, gates_GSA, w).as_text()
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(tiles_grad(x_GSD, gates_GSA, w))):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('change, runs', [
    ({}, True), ({'matmul': 'xla'}, False), ({'matmul': 'onednn'}, False), ({'activation': 'gelu'}, False),
    ({'dtype': jnp.bfloat16}, 'bf16'), ({'dtype': jnp.float16}, False), ({'d_model': 48}, False),
    ({'d_model': 256}, True), ({'d_model': 288}, False),
    ({'expert_width': 1024}, True), ({'expert_width': 1056}, False)])
def test_taken_only_for_narrow_f32_swiglu_layers_with_matmul_auto(change, runs):
  d_model, width = change.get('d_model', D), change.get('expert_width', F)
  dtype = change.get('dtype', jnp.float32)
  w = ExpertWeights(*(jnp.zeros(s, dtype) for s in ((8, d_model, width), (8, d_model, width), (8, width, d_model))))
  x_XD = jnp.zeros((16, d_model), dtype)
  if runs == 'bf16':  # taken where this CPU has the bf16 handlers
    runs = bf16_here()
  assert fused_swiglu.runs(x_XD, w, change.get('activation', 'swiglu'), change.get('matmul', 'auto')) == runs


def test_where_it_cannot_build_the_tiles_run(monkeypatch):
  monkeypatch.setattr(kernel, 'load', lambda: 'cannot build the fused SwiGLU FFN: no g++ (test)')
  w = _weights(2)
  x_XD = jnp.ones((4, D))
  assert not fused_swiglu.runs(x_XD, w, 'swiglu', 'auto')
  calls = []
  monkeypatch.setattr(grouped, 'grouped_ffn', lambda *args, **kwargs: calls.append(args) or args[0])
  grouped.rows_ffn(x_XD, jnp.arange(4), jnp.arange(4)[:, None], w, jnp.array([4, 0]), 'swiglu', 'auto')
  assert len(calls) == 1


def _dense_grad(cfg: ModelConfig, x_BTD):
  """Jitted (state, x) -> (loss, gradients) of a DenseFFN of cfg, and its state."""
  graph, state = nnx.split(DenseFFN(cfg, cfg.d_ff, nnx.Rngs(0)))
  loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graph, state)(x)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state


def test_vmap_runs_the_calls_per_element():
  """jax.vmap over a DenseFFN that takes the fused calls (512 rows an element), and over its gradient, gives each
  element's own values and gradients: the calls run once per element."""
  cfg = ModelConfig(d_model=D, d_ff=64, n_layers=1, n_heads=1, vocab_size=16, activation='swiglu')
  graph, state = nnx.split(DenseFFN(cfg, cfg.d_ff, nnx.Rngs(0)))
  loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graph, state)(x)))
  x_PBTD = jnp.asarray(np.random.default_rng(7).normal(size=(2, 1, 512, D)), jnp.float32)
  per_element = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))
  assert 'slmjax_swiglu_ffn_bwd' in per_element.lower(state, x_PBTD).as_text()
  got = per_element(state, x_PBTD)
  for i in range(2):
    want = jax.value_and_grad(loss)(state, x_PBTD[i])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g[i], w, rtol=2e-5, atol=2e-5)


def test_dense_ffn_takes_the_call_with_the_same_values_and_gradients_as_xla(monkeypatch):
  """A 512-row f32 SwiGLU DenseFFN runs as the fused calls, d_ff split in parts (3 cores: 3 parts of 32), with
  XLA's output and gradients; `matmul='xla'` keeps XLA's dots."""
  monkeypatch.setattr(kernel, '_cores', lambda: 3)
  cfg = ModelConfig(d_model=D, d_ff=96, n_layers=1, n_heads=1, vocab_size=16, activation='swiglu')
  x_BTD = np.random.default_rng(5).normal(size=(4, 128, D)).astype(np.float32)
  (fused, state), (xla, _) = (_dense_grad(dataclasses.replace(cfg, matmul=m), x_BTD) for m in ('auto', 'xla'))
  assert 'slmjax_swiglu_ffn_fwd' in fused.lower(state, x_BTD).as_text()
  assert 'slmjax_swiglu_ffn' not in xla.lower(state, x_BTD).as_text()
  for got, want in zip(jax.tree.leaves(fused(state, x_BTD)), jax.tree.leaves(xla(state, x_BTD))):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('cores, rows, change, parts', [
    (2, 512, {}, 1), (2, 512, {'d_ff': 128}, 2), (3, 512, {}, 3), (4, 512, {}, 3), (1, 512, {}, 1), (2, 511, {}, 0),
    (2, 512, {'matmul': 'xla'}, 0), (2, 512, {'dtype': jnp.bfloat16}, 'bf16'), (2, 512, {'d_model': 288}, 0),
    (2, 512, {'d_ff': 2048}, 2), (2, 512, {'d_ff': 4096}, 0), (8, 512, {'d_ff': 1024}, 8), (2, 512, {'d_ff': 80}, 0)])
def test_dense_parts_one_a_core_where_the_width_divides(monkeypatch, cores, rows, change, parts):
  monkeypatch.setattr(kernel, '_cores', lambda: cores)
  d_model, d_ff, dtype = change.get('d_model', D), change.get('d_ff', 96), change.get('dtype', jnp.float32)
  w = (jnp.zeros((d_model, d_ff), dtype), jnp.zeros((d_model, d_ff), dtype), jnp.zeros((d_ff, d_model), dtype))
  if parts == 'bf16':  # one part (96 is 3 x 32) where this CPU has the bf16 handlers
    parts = int(bf16_here())
  assert kernel.dense_parts(jnp.zeros((rows, d_model), dtype), *w, change.get('matmul', 'auto')) == parts


@pytest.mark.parametrize('d, f', WIDTHS)
def test_bf16_calls_match_the_f32_ffn_of_the_same_bf16_values(d, f):
  """bf16 x, weights and dy (a run over two 64-row blocks, an empty expert, a run not a multiple of 8 rows):
  the output, dx and the weight gradients (in bf16) are the f32 FFN's of the same values to bf16 rounding (2% of
  the largest), and the dense FFN takes the bf16 calls too."""
  if not bf16_here():
    pytest.skip('no AVX512_BF16 here: no bf16 handlers')
  w = ExpertWeights(*(jnp.asarray(a, jnp.bfloat16) for a in _weights(3, seed=6, d=d, f=f)))
  sizes_E = np.array([130, 0, 13], np.int32)
  N = int(sizes_E.sum())
  rng = np.random.default_rng(7)
  x_ND, dy_ND = (jnp.asarray(rng.normal(size=(N, d)), jnp.bfloat16) for _ in range(2))
  starts = np.concatenate([[0], np.cumsum(sizes_E)])
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)

  def reference(x_ND, w):
    return jnp.concatenate([expert_ffn(x_ND[None, lo:hi], ExpertWeights(*(a[e:e + 1] for a in w)), 'swiglu')[0]
                            for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]))])

  fused = lambda x_ND, w: fused_swiglu.swiglu_ffn(x_ND, jnp.arange(N), jnp.arange(N)[:, None], w,
                                                  jnp.asarray(sizes_E))
  got = (fused(x_ND, w), *jax.grad(lambda x, w: jnp.vdot(f32(fused(x, w)), f32(dy_ND)), (0, 1))(x_ND, w))
  want = (reference(f32(x_ND), f32(w)),
          *jax.grad(lambda x, w: jnp.vdot(reference(x, w), f32(dy_ND)), (0, 1))(f32(x_ND), f32(w)))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got))
  for g, r in zip(jax.tree.leaves(f32(got)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, atol=0.02 * float(np.abs(r).max()), rtol=0.02)
  parts = kernel.dense_parts(jnp.zeros((512, d), jnp.bfloat16), w.w_gate_EDF[0], w.w_up_EDF[0],
                             w.w_down_EFD[0], 'auto')
  assert parts >= 1


def test_bf16_calls_read_f32_master_weights_and_return_f32_gradients():
  """bf16 rows with f32 weights (the model's master weights, uncast): the calls round the weights as they pack
  them, the output is bf16, and the weight gradients come back in f32, equal to those of the same weights cast to
  bf16 first (to 2% of the largest: those are rounded to bf16 once more)."""
  if not bf16_here():
    pytest.skip('no AVX512_BF16 here: no bf16 handlers')
  w32 = ExpertWeights(*(jnp.asarray(a) for a in _weights(2, seed=8)))
  sizes_E = np.array([70, 9], np.int32)
  N = int(sizes_E.sum())
  x_ND = jnp.asarray(np.random.default_rng(9).normal(size=(N, D)), jnp.bfloat16)
  assert fused_swiglu.runs(x_ND, w32, 'swiglu', 'auto')
  fused = lambda x_ND, w: fused_swiglu.swiglu_ffn(x_ND, jnp.arange(N), jnp.arange(N)[:, None], w,
                                                  jnp.asarray(sizes_E))
  loss = lambda w: jnp.sum(jnp.sin(fused(x_ND, w).astype(jnp.float32)))
  got_y, got_dw = fused(x_ND, w32), jax.grad(loss)(w32)
  cast = lambda w: ExpertWeights(*(a.astype(jnp.bfloat16) for a in w))
  want_y, want_dw = fused(x_ND, cast(w32)), jax.grad(lambda w: loss(w))(cast(w32))
  assert got_y.dtype == jnp.bfloat16 and all(a.dtype == jnp.float32 for a in got_dw)
  np.testing.assert_array_equal(got_y, want_y)  # the same bf16 weights inside the call
  for g, r in zip(got_dw, want_dw):
    np.testing.assert_allclose(g, r.astype(jnp.float32), atol=0.02 * float(np.abs(r.astype(jnp.float32)).max()))
