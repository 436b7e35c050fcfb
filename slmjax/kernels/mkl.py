"""2-D matmuls in oneMKL through an XLA:CPU FFI custom call, for `ModelConfig.matmul='mkl'` (the `[mkl]` extra).

Shape letters: slmjax/shapes.py does not cover a bare GEMM; here M rows, K contracted, N columns.

bf16 operands run MKL's cblas_gemm_bf16bf16f32 (f32 accumulation, the CPU's bf16 matrix units where it has them:
AMX, AVX512_BF16), f32 operands cblas_sgemm. The handler (mkl_gemm.cc) is compiled with the system g++ against
`jax.ffi.include_dir()` at first use, into $SLMJAX_CACHE (default ~/.cache/slmjax) under a name that hashes the
source and the jax version: at first use rather than at install, so the headers always match the jaxlib that runs
it and a pure-Python install stays pure. libmkl_rt comes from the `mkl` wheel ($SLMJAX_MKL_RT overrides).
Where any piece is missing (not CPU, no g++, no MKL) `matmul` says so once and uses XLA's dot instead.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name('mkl_gemm.cc')
TARGETS = {jnp.dtype(jnp.bfloat16): 'slmjax_mkl_gemm_bf16', jnp.dtype(jnp.float32): 'slmjax_mkl_gemm_f32'}


def libmkl_rt() -> str | None:
  """The path of libmkl_rt: $SLMJAX_MKL_RT, else the one the `mkl` wheel puts in <prefix>/lib."""
  if os.environ.get('SLMJAX_MKL_RT'):
    return os.environ['SLMJAX_MKL_RT']
  found = sorted(glob.glob(os.path.join(sys.prefix, 'lib', 'libmkl_rt.so*')))
  return found[0] if found else None


def build(cache: pathlib.Path | None = None) -> pathlib.Path:
  """The compiled handler library, built once per source and jax version (atomically: concurrent first uses
  each compile to a temporary name and rename)."""
  cache = cache or pathlib.Path(os.environ.get('SLMJAX_CACHE', pathlib.Path.home() / '.cache' / 'slmjax'))
  key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
  lib = cache / 'kernels' / f'mkl_gemm-{key}.so'
  if not lib.exists():
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
      out = pathlib.Path(tmp) / lib.name
      cmd = [os.environ.get('CXX', 'g++'), '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
             f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(out), '-ldl']
      result = subprocess.run(cmd, capture_output=True, text=True)
      if result.returncode:
        raise RuntimeError(f'{cmd[0]} failed: {result.stderr.strip().splitlines()[-1:]}')
      os.replace(out, lib)
  return lib


@functools.cache
def load() -> str | None:
  """Builds, loads and registers the FFI targets once; None when ready, else why not (one line)."""
  if jax.default_backend() != 'cpu':
    return f'the MKL matmul is for XLA:CPU, not {jax.default_backend()}'
  mkl = libmkl_rt()
  if mkl is None:
    return "no libmkl_rt (pip install -e '.[mkl]', or set SLMJAX_MKL_RT)"
  try:
    lib = ctypes.CDLL(str(build()))
  except (OSError, RuntimeError) as e:
    return f'cannot build the MKL FFI handler: {e}'
  status = lib.slmjax_mkl_init(mkl.encode())
  if status:
    return f'{mkl} ' + ('does not load' if status == 1 else 'lacks cblas_gemm_bf16bf16f32 / cblas_sgemm')
  jax.ffi.register_ffi_target('slmjax_mkl_gemm_bf16', jax.ffi.pycapsule(lib.SlmjaxMklGemmBf16), platform='cpu')
  jax.ffi.register_ffi_target('slmjax_mkl_gemm_f32', jax.ffi.pycapsule(lib.SlmjaxMklGemmF32), platform='cpu')
  return None


@functools.cache
def _notice(reason: str) -> None:
  print(f'slmjax: matmul=mkl falls back to XLA: {reason}', file=sys.stderr)


def gemm_f32(a: jax.Array, b: jax.Array, transa: bool = False, transb: bool = False) -> jax.Array:
  """op(a) @ op(b) in float32 by MKL (op transposes where asked, without a copy); a and b bf16 or both f32."""
  m = a.shape[1] if transa else a.shape[0]
  n = b.shape[0] if transb else b.shape[1]
  call = jax.ffi.ffi_call(TARGETS[a.dtype], jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a, b, transa=int(transa), transb=int(transb))


@jax.custom_vjp
def _mkl_matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  return gemm_f32(x_MK, w_KN).astype(x_MK.dtype)


def _fwd(x_MK, w_KN):
  return _mkl_matmul(x_MK, w_KN), (x_MK, w_KN)


def _bwd(res, dy_MN):
  """The two GEMMs of the backward: dx = dy w^T, dw = x^T dy, transposes read in place, f32 accumulation."""
  x_MK, w_KN = res
  dy_MN = dy_MN.astype(x_MK.dtype)
  return gemm_f32(dy_MN, w_KN, transb=True).astype(x_MK.dtype), gemm_f32(x_MK, dy_MN, transa=True).astype(w_KN.dtype)


_mkl_matmul.defvjp(_fwd, _bwd)


def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """x_MK @ w_KN in MKL, differentiable, in the operands' dtype (bf16 or f32); XLA's dot (with a one-time
  notice) where MKL cannot run or for other dtypes."""
  reason = load()
  if reason is None and x_MK.dtype != w_KN.dtype:
    reason = f'operands of two dtypes ({x_MK.dtype}, {w_KN.dtype})'
  if reason is None and x_MK.dtype not in TARGETS:
    reason = f'no MKL GEMM for {x_MK.dtype}'
  if reason is not None:
    _notice(reason)
    return x_MK @ w_KN
  return _mkl_matmul(x_MK, w_KN)
