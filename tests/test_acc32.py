"""slmjax/kernels/acc32.py: bf16 einsums accumulate in f32 in every product, forward and backward (the form
XLA:CPU runs on bf16 dot-product units), agree with an f32 reference, and leave f32 operands untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slmjax.kernels import acc32, gemm

SPECS = {'MK,KN->MN': ((48, 40), (40, 24)), 'BKQTZ,BKUZ->BKQTU': ((2, 2, 1, 8, 16), (2, 2, 12, 16)),
         'BKQTU,BKUY->BKQTY': ((2, 2, 1, 8, 12), (2, 2, 12, 16))}


def operands(spec, dtype):
  (sa, sb), (ka, kb) = SPECS[spec], jax.random.split(jax.random.key(0))
  return jax.random.normal(ka, sa).astype(dtype), jax.random.normal(kb, sb).astype(dtype)


def loss(einsum, spec):
  def value(a, b):
    y = einsum(spec, a, b).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))  # a non-uniform cotangent
  return value


def dots(fn, *args):
  eqns, todo = [], [jax.make_jaxpr(fn)(*args).jaxpr]
  while todo:
    jaxpr = todo.pop()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        eqns.append(eqn)
      todo += [p.jaxpr if hasattr(p, 'jaxpr') else p for p in eqn.params.values() if hasattr(p, 'eqns') or
               hasattr(p, 'jaxpr')]
  return eqns


@pytest.mark.parametrize('spec', SPECS)
def test_bf16_products_accumulate_in_f32_forward_and_backward(spec):
  a, b = operands(spec, jnp.bfloat16)
  grad = jax.value_and_grad(loss(acc32.einsum, spec), argnums=(0, 1))
  found = dots(grad, a, b)
  assert len(found) == 3  # the forward and one per operand's cotangent
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
    assert eqn.params['preferred_element_type'] == jnp.float32


@pytest.mark.parametrize('spec', SPECS)
def test_bf16_einsum_and_gradients_match_an_f32_reference(spec):
  a, b = operands(spec, jnp.bfloat16)
  got, got_g = jax.jit(jax.value_and_grad(loss(acc32.einsum, spec), argnums=(0, 1)))(a, b)
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  want, want_g = jax.value_and_grad(loss(jnp.einsum, spec), argnums=(0, 1))(a32, b32)
  assert got_g[0].dtype == got_g[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, rtol=2e-2)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3e-2 * float(jnp.abs(w).max()))


def test_f32_operands_take_the_plain_einsum():
  a, b = operands('MK,KN->MN', jnp.float32)
  np.testing.assert_array_equal(acc32.matmul(a, b), a @ b)
  assert all(eqn.params['preferred_element_type'] in (None, jnp.float32) for eqn in dots(acc32.matmul, a, b))
  np.testing.assert_array_equal(gemm.dot(a, b.T, transb=True), a @ b)
