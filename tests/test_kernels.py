"""slmjax/kernels/gemm.py: oneMKL's and oneDNN's GEMMs through the XLA FFI agree with XLA's dot (forward and
gradients, bf16 and f32), a model with matmul='mkl' / 'onednn' trains like matmul='xla', and the fallback is one
notice. A library's tests skip where the handlers cannot be built or it cannot be loaded (no g++, no `mkl` /
`onednn-cpu-gomp` wheel, not CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slmjax import layers, model as model_lib
from slmjax.config import ModelConfig
from slmjax.kernels import gemm


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """The handlers build into a temporary cache (not ~/.cache), once for the module."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('SLMJAX_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield


@pytest.fixture(params=sorted(gemm.LIBRARIES))
def library(request, cache):
  """Each library, built and registered once; skips where it cannot be."""
  reason = gemm.load(request.param)
  if reason is not None:
    pytest.skip(f'no {request.param} matmul here: {reason}')
  return request.param


def skip_unless_runs(library, dtype):
  """Skips where `library`'s GEMM for `dtype` does not run on this CPU (oneDNN's bf16 one without AVX-512)."""
  if not gemm.runs_dtype(library, dtype):
    pytest.skip(f'no {library} {jnp.dtype(dtype).name} GEMM on this CPU')


TOL = {jnp.bfloat16: dict(rtol=2e-2, atol=2e-2), jnp.float32: dict(rtol=1e-5, atol=1e-5)}


def operands(m=48, k=40, n=24, dtype=jnp.float32):
  a, b = jax.random.normal(jax.random.key(0), (m, k)), jax.random.normal(jax.random.key(1), (k, n))
  return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize('transa, transb', [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_reads_transposes_in_place(library, transa, transb):
  a, b = operands()
  stored_a, stored_b = (a.T if transa else a), (b.T if transb else b)
  got = jax.jit(lambda x, y: gemm.gemm_f32(x, y, transa, transb, library))(stored_a, stored_b)
  np.testing.assert_allclose(got, a @ b, **TOL[jnp.float32])


def test_vmap_runs_the_call_per_element(library):
  """jax.vmap over stacked operands (the call loops over them) gives each element's own product."""
  a, b = operands()
  got = jax.jit(jax.vmap(lambda x, y: gemm.gemm_f32(x, y, library=library)))(jnp.stack([a, -a]), jnp.stack([b, b]))
  np.testing.assert_allclose(got, jnp.stack([a @ b, -(a @ b)]), **TOL[jnp.float32])


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_matmul_forward_and_gradients_match_xla(library, dtype):
  skip_unless_runs(library, dtype)
  matmul = lambda x, y: gemm.matmul(x, y, library)
  a, b = operands(dtype=dtype)
  c = jax.random.normal(jax.random.key(2), (48, 24))  # a cotangent that weights every output differently
  loss = lambda f: lambda x, y: jnp.sum(f(x, y).astype(jnp.float32) * c)
  xla = lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype)
  got_y, want_y = jax.jit(matmul)(a, b), jax.jit(xla)(a, b)
  assert got_y.dtype == dtype and got_y.shape == (48, 24)
  np.testing.assert_allclose(got_y.astype(np.float32), want_y.astype(np.float32), **TOL[dtype])
  got = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(a, b)
  want = jax.jit(jax.grad(loss(xla), argnums=(0, 1)))(a, b)
  for g, w in zip(got, want):
    assert g.dtype == dtype
    scale = float(jnp.abs(w.astype(jnp.float32)).max())  # bf16 gradients: relative to their largest entry
    np.testing.assert_allclose(g.astype(np.float32) / scale, w.astype(np.float32) / scale, **TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_model_loss_and_gradients_with_a_vendor_gemm_match_xla(library, dtype):
  skip_unless_runs(library, dtype)
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, d_ff=64, dtype=dtype)
  tokens_BT = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)

  def loss_and_grads(matmul):
    graphdef, state = nnx.split(model_lib.Transformer(cfg.replace(matmul=matmul), nnx.Rngs(0)))

    def loss(state):
      logits_BTV = nnx.merge(graphdef, state)(tokens_BT)[0]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :-1]), tokens_BT[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(state)

  (got, got_g), (want, want_g) = loss_and_grads(library), loss_and_grads('xla')
  tol = TOL[jnp.dtype(dtype).type]
  np.testing.assert_allclose(got, want, **tol)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    scale = float(jnp.abs(w).max()) or 1.0
    np.testing.assert_allclose(g / scale, w / scale, **tol)


def test_fallback_is_xla_with_one_notice(monkeypatch, capsys):
  monkeypatch.setattr(gemm, 'load', lambda library: 'no libmkl_rt (test)')
  gemm._notice.cache_clear()
  a, b = operands()
  np.testing.assert_array_equal(gemm.matmul(a, b), a @ b)
  gemm.matmul(a, b)
  assert capsys.readouterr().err == 'slmjax: matmul=mkl falls back to XLA: no libmkl_rt (test)\n'


def test_a_library_without_a_bf16_gemm_here_falls_back_for_bf16_only(library, monkeypatch, capsys):
  """Where the library's bf16 GEMM does not run on this CPU (`load` found it unimplemented), bf16 products take
  XLA's dot with one notice, f32 ones still the library."""
  monkeypatch.setattr(gemm, '_no_bf16', {library})
  gemm._notice.cache_clear()
  a, b = operands(dtype=jnp.bfloat16)
  assert 'slmjax_' not in jax.jit(lambda x, y: gemm.matmul(x, y, library)).lower(a, b).as_text()
  assert capsys.readouterr().err == (f'slmjax: matmul={library} falls back to XLA: its bf16 GEMM does not run on '
                                     "this CPU (oneDNN 3.2's needs AVX-512)\n")
  a, b = operands()
  assert f'slmjax_{library}_gemm_f32' in jax.jit(lambda x, y: gemm.matmul(x, y, library)).lower(a, b).as_text()
  assert gemm.resolve('auto', jnp.bfloat16, gemm.AUTO_MIN_MACS) == 'xla'


def test_build_failure_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', 'false')  # a compiler that always fails
  with pytest.raises(RuntimeError, match='^false failed'):
    gemm.build(tmp_path)


def test_config_rejects_unknown_matmul():
  with pytest.raises(ValueError, match='matmul'):
    ModelConfig(matmul='cublas')



def test_auto_takes_onednn_for_large_bf16_backward_products_on_one_cpu_device_only(cache):
  # without the wheel (or g++), or where its bf16 GEMM does not run on this CPU, auto is XLA's dot
  onednn = 'onednn' if gemm.runs_dtype('onednn', jnp.bfloat16) else 'xla'
  big, small = gemm.AUTO_MIN_MACS, gemm.AUTO_MIN_MACS - 1
  assert gemm.resolve('auto', jnp.bfloat16, big, transposed=True) == onednn  # dy w^T, x^T dy
  assert gemm.resolve('auto', jnp.bfloat16, big, transposed=False) == 'xla'  # the forward: XLA is as fast
  assert gemm.resolve('auto', jnp.bfloat16, small) == 'xla'  # the custom call's overhead loses
  assert gemm.resolve('auto', jnp.float32, big) == 'xla'
  assert gemm.resolve('xla', jnp.bfloat16, big) == 'xla' and gemm.resolve('mkl', jnp.float32, 1) == 'mkl'
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ('data',))):
    assert gemm.resolve('auto', jnp.bfloat16, big) == 'xla'  # on a mesh XLA partitions the products itself
  a, b = operands(256, 256, 256, dtype=jnp.bfloat16)  # 2^24 multiply-adds: just large enough
  weighted = lambda y: jnp.sum(y.astype(jnp.float32) * (jnp.arange(y.size).reshape(y.shape) % 7 - 3))
  forward = lambda matmul: jax.jit(lambda x, y: layers.linear(x, y, matmul=matmul))
  grads = lambda matmul: jax.jit(jax.grad(lambda x, y: weighted(layers.linear(x, y, matmul=matmul)),
                                          argnums=(0, 1)))
  assert 'slmjax_onednn' not in forward('auto').lower(a, b).as_text()  # forward (and decode): XLA's dot
  assert ('slmjax_onednn_gemm_bf16' in grads('auto').lower(a, b).as_text()) == (onednn == 'onednn')
  np.testing.assert_array_equal(forward('auto')(a, b), forward('xla')(a, b))
  for got, want in zip(grads('auto')(a, b), grads('xla')(a, b)):
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), **TOL[jnp.bfloat16])
  f32 = operands(256, 256, 256)
  assert forward('auto').lower(*f32).as_text() == forward('xla').lower(*f32).as_text()
  assert grads('auto').lower(*f32).as_text() == grads('xla').lower(*f32).as_text()
  small_bf16 = operands(dtype=jnp.bfloat16)
  assert grads('auto').lower(*small_bf16).as_text() == grads('xla').lower(*small_bf16).as_text()
