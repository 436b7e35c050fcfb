"""2-D matmuls in a vendor library through an XLA:CPU FFI custom call, for `ModelConfig.matmul='mkl'` (oneMKL,
the `[mkl]` extra) and `'onednn'` (oneDNN, the `[onednn]` extra).

Shape letters: slmjax/shapes.py does not cover a bare GEMM; here M rows, K contracted, N columns.

bf16 operands run the library's bf16 x bf16 -> f32 GEMM (cblas_gemm_bf16bf16f32, dnnl_gemm_bf16bf16f32: the CPU's
bf16 matrix units where the library uses them; oneDNN does on AMD's AVX512_BF16, MKL did not), f32 operands its
sgemm. The handlers (gemm.cc) are compiled with the system g++ against `jax.ffi.include_dir()` at first use, into
$SLMJAX_CACHE (default ~/.cache/slmjax) under a name that hashes the source and the jax version: at first use
rather than at install, so the headers always match the jaxlib that runs them and a pure-Python install stays
pure. The libraries come from their wheels ($SLMJAX_MKL_RT, $SLMJAX_DNNL override). Where any piece is missing
(not CPU, no g++, no library) `matmul` says so once and uses XLA's dot instead. `'auto'` (ModelConfig's default)
runs the bf16 backward's products (dy w^T, x^T dy: a transposed operand) of at least AUTO_MIN_MACS multiply-adds
in oneDNN on one CPU device where it loads, every other product in XLA's dot, without a notice. Those are where
XLA's bf16 dot is slow (a linear layer's forward + backward at 4,096 rows: 0.45-0.62x with them in oneDNN), while
its plain products are as fast as oneDNN's or faster (0.95-1.06x at 4,096 rows, 1.1-4.4x below; bf16 decode ran
1.1-2.6x slower a token with its products in oneDNN), and small products lose to the custom call's overhead. f32
stays on XLA: oneDNN's x^T dy sped the llama step up 0-15% but slowed the cpu ladder's rungs 5-18%.

`build` and `register` also compile and register slmjax's own handler libraries (swiglu_ffn.cc, attention.cc,
gather_sum.cc, router.cc, adamw.cc).
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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from slmjax.kernels import acc32

SOURCE = pathlib.Path(__file__).with_name('gemm.cc')
_libraries = []  # the handler libraries `register` loaded, kept for the process's life
_registered: set[str] = set()  # the FFI targets `register` registered
_no_bf16: set[str] = set()  # the loaded libraries whose bf16 GEMM does not run on this CPU (f32 only)


class Library(NamedTuple):
  """A vendor GEMM library: where its shared object is and how to get it."""
  env: str  # an environment variable naming the shared object
  pattern: str  # its file name in <prefix>/lib, where its wheel puts it
  install: str


LIBRARIES = {'mkl': Library('SLMJAX_MKL_RT', 'libmkl_rt.so*', "pip install -e '.[mkl]'"),
             'onednn': Library('SLMJAX_DNNL', 'libdnnl.so.3*', "pip install -e '.[onednn]'")}


def library_path(library: str) -> str | None:
  """The shared object of `library`: its environment variable, else the one its wheel puts in <prefix>/lib."""
  lib = LIBRARIES[library]
  if os.environ.get(lib.env):
    return os.environ[lib.env]
  found = sorted(glob.glob(os.path.join(sys.prefix, 'lib', lib.pattern)))
  return found[0] if found else None


def target(library: str, dtype) -> str:
  return f'slmjax_{library}_gemm_{jnp.dtype(dtype).name.replace("float", "f")}'


def build(cache: pathlib.Path | None = None, source: pathlib.Path = SOURCE, flags: tuple[str, ...] = ('-O2',)
          ) -> pathlib.Path:
  """The compiled handler library of `source`, built once per source (with the .h files beside it), flags and jax
  version (atomically: concurrent first uses each compile to a temporary name and rename). With -march=native the
  key holds this CPU's feature flags too, so a cache shared between machines never runs another CPU's
  instructions."""
  cache = cache or pathlib.Path(os.environ.get('SLMJAX_CACHE', pathlib.Path.home() / '.cache' / 'slmjax'))
  cpu = _cpu_flags() if '-march=native' in flags else ''
  headers = b''.join(h.read_bytes() for h in sorted(source.parent.glob('*.h')))  # what the source may include
  key = hashlib.sha256(source.read_bytes() + headers + jax.__version__.encode() + ' '.join(flags).encode()
                       + cpu.encode()).hexdigest()[:16]
  lib = cache / 'kernels' / f'{source.stem}-{key}.so'
  if not lib.exists():
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
      out = pathlib.Path(tmp) / lib.name
      cmd = [os.environ.get('CXX', 'g++'), *flags, '-std=c++17', '-shared', '-fPIC', '-w',
             f'-I{jax.ffi.include_dir()}', str(source), '-o', str(out), '-ldl']
      try:
        result = subprocess.run(cmd, capture_output=True, text=True)
      except OSError as e:
        raise RuntimeError(f'{cmd[0]}: {e}') from None
      if result.returncode:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if 'error' in line] or lines[-1:]
        raise RuntimeError(f'{cmd[0]} failed: {errors[:1]}')
      os.replace(out, lib)
  return lib


def register(source: pathlib.Path, flags: tuple[str, ...], handlers: dict[str, str]) -> set[str]:
  """Builds `source` and registers each handler symbol it exports (key) as an XLA:CPU FFI target (value), once a
  process (XLA refuses a second registration); returns the targets registered (a handler compiled only for some
  CPUs may be absent). Raises OSError or RuntimeError when the library cannot build or load."""
  if done := _registered & set(handlers.values()):
    return done
  lib = ctypes.CDLL(str(build(source=source, flags=flags)))
  for symbol, target in handlers.items():
    if hasattr(lib, symbol):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
      _registered.add(target)
  _libraries.append(lib)
  return _registered & set(handlers.values())


def call_target(name: str, call: str, dtype) -> str:
  """The FFI target of slmjax's `name` handlers' `call` ('fwd' or 'bwd') for operands of `dtype` (f32 or bf16)."""
  return f'slmjax_{name}_{call}' + ('_bf16' if jnp.dtype(dtype) == jnp.bfloat16 else '')


def load_calls(source: pathlib.Path, flags: tuple[str, ...], name: str, what: str) -> str | None:
  """Builds `source` and registers its forward and backward handlers in f32 and bf16 (for `name` 'gather_sum':
  SlmjaxGatherSumFwd, ...FwdBf16, ...Bwd, ...BwdBf16) as the FFI targets `call_target` names; None when ready,
  else why not (one line, naming `what`)."""
  symbol = 'Slmjax' + name.title().replace('_', '')
  handlers = {f'{symbol}{call.capitalize()}{suffix}': call_target(name, call, dtype)
              for call in ('fwd', 'bwd') for suffix, dtype in (('', jnp.float32), ('Bf16', jnp.bfloat16))}
  return register_all(source, flags, handlers, what)


def register_all(source: pathlib.Path, flags: tuple[str, ...], handlers: dict[str, str], what: str) -> str | None:
  """`register` of every handler in `handlers` (XLA:CPU only); None when all are registered, else why not (one
  line, naming `what`)."""
  if jax.default_backend() != 'cpu':
    return f'{what} is for XLA:CPU, not {jax.default_backend()}'
  try:
    registered = register(source, flags, handlers)
  except (OSError, RuntimeError) as e:
    return f'cannot build {what}: {e}'
  if missing := sorted(set(handlers.values()) - registered):
    return f'{what}: {source.name} lacks the handlers of {", ".join(missing)}'
  return None


def row_call_pays(x: jax.Array, min_f32_elements: int) -> bool:
  """Whether a row-wise call of slmjax's own (gather_sum, router) takes operand x: bf16 always (XLA:CPU converts
  bf16 rows in passes of their own), f32 from `min_f32_elements` on (below it XLA's f32 ops cost less than a call),
  on one CPU device."""
  dtype_pays = x.dtype == jnp.bfloat16 or (x.dtype == jnp.float32 and x.size >= min_f32_elements)
  return dtype_pays and on_one_cpu_device()


def ffi_call(target: str, results):
  """jax.ffi.ffi_call of one of slmjax's handlers (registered by `load` or `register`): under jax.vmap it runs
  once per mapped element (the handlers take unbatched operands)."""
  return jax.ffi.ffi_call(target, results, vmap_method='sequential')


def _cpu_flags() -> str:
  """This CPU's model and feature flags (Linux), '' where unknown."""
  try:
    with open('/proc/cpuinfo') as f:
      return ''.join(line for line in f if line.startswith(('flags', 'model name')))[:8192]
  except OSError:
    return ''


def cpu_has(feature: str) -> bool:
  """Whether this CPU lists `feature` (a /proc/cpuinfo flag, e.g. 'avx512f'); False where unknown."""
  return feature in _cpu_flags().split()


@functools.cache
def load(library: str = 'mkl') -> str | None:
  """Builds and loads the handlers and registers `library`'s FFI targets once; None when ready, else why not
  (one line)."""
  if jax.default_backend() != 'cpu':
    return f'the {library} matmul is for XLA:CPU, not {jax.default_backend()}'
  path = library_path(library)
  if path is None:
    return f'no {LIBRARIES[library].pattern} ({LIBRARIES[library].install}, or set {LIBRARIES[library].env})'
  try:
    lib = ctypes.CDLL(str(build()))
  except (OSError, RuntimeError) as e:
    return f'cannot build the GEMM FFI handlers: {e}'
  status = getattr(lib, f'slmjax_{library}_init')(path.encode())
  if status in (1, 2):
    return f'{path} ' + ('does not load' if status == 1 else 'lacks its bf16 or f32 GEMM')
  if status == 3:
    _no_bf16.add(library)
  title = library.capitalize()
  for dtype, name in ((jnp.bfloat16, 'Bf16'), (jnp.float32, 'F32'))[status == 3:]:
    handler = getattr(lib, f'Slmjax{title}Gemm{name}')
    jax.ffi.register_ffi_target(target(library, dtype), jax.ffi.pycapsule(handler), platform='cpu')
  return None


def on_one_cpu_device() -> bool:
  """Whether the program being traced runs on one CPU device (no mesh, or a mesh of one): where a custom call
  or a loop of row tiles is a plain fast path. On a mesh XLA must partition the products itself."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() == 'cpu' and (mesh.empty or mesh.size == 1)


# 'auto' leaves smaller products to XLA: the cpu ladder's 32x2 rung (x^T dy 32 x 2,048 x 128) trained 1.33x slower
# (dense) and 1.73x (MoE tiles) with them in oneDNN, 64x2 (64 x 2,048 x 256) 0.93x / 0.98x.
AUTO_MIN_MACS = 2 ** 24


def resolve(library: str, dtype, macs: int, transposed: bool = True) -> str:
  """The library `matmul='auto'` stands for in a product of `dtype` operands with `macs` multiply-adds, one of
  them `transposed` (see the module docstring); other names as given."""
  if library != 'auto':
    return library
  wanted = transposed and jnp.dtype(dtype) == jnp.bfloat16 and macs >= AUTO_MIN_MACS
  return 'onednn' if wanted and on_one_cpu_device() and runs_dtype('onednn', dtype) else 'xla'


def runs_dtype(library: str, dtype) -> bool:
  """Whether `library` loads and runs its GEMM for `dtype` operands on this CPU (oneDNN 3.2's bf16 GEMM needs
  AVX-512; on AVX2 CPUs it answers "unimplemented" and only its f32 GEMM runs)."""
  return load(library) is None and not (jnp.dtype(dtype) == jnp.bfloat16 and library in _no_bf16)


@functools.cache
def _notice(library: str, reason: str) -> None:
  print(f'slmjax: matmul={library} falls back to XLA: {reason}', file=sys.stderr)


def gemm_f32(a: jax.Array, b: jax.Array, transa: bool = False, transb: bool = False,
             library: str = 'mkl') -> jax.Array:
  """op(a) @ op(b) in float32 by `library` (op transposes where asked, without a copy); a and b both bf16 or
  both f32; `load(library)` must have succeeded."""
  m = a.shape[1] if transa else a.shape[0]
  n = b.shape[0] if transb else b.shape[1]
  call = ffi_call(target(library, a.dtype), jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a, b, transa=int(transa), transb=int(transb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MK: jax.Array, w_KN: jax.Array, library: str) -> jax.Array:
  return dot(x_MK, w_KN, library=library)


def _fwd(x_MK, w_KN, library):
  return _matmul(x_MK, w_KN, library), (x_MK, w_KN)


def _bwd(library, res, dy_MN):
  """The two GEMMs of the backward: dx = dy w^T, dw = x^T dy, transposes read in place, f32 accumulation."""
  x_MK, w_KN = res
  dy_MN = dy_MN.astype(x_MK.dtype)
  return dot(dy_MN, w_KN, transb=True, library=library), dot(x_MK, dy_MN, transa=True, library=library)


_matmul.defvjp(_fwd, _bwd)


def _runs(library: str, a: jax.Array, b: jax.Array) -> bool:
  """Whether `library` (a key of LIBRARIES; any other name is XLA's dot) takes these operands; where it cannot,
  a one-time notice says why."""
  if library not in LIBRARIES:
    return False
  reason = load(library)
  if reason is None and a.dtype != b.dtype:
    reason = f'operands of two dtypes ({a.dtype}, {b.dtype})'
  if reason is None and a.dtype not in (jnp.bfloat16, jnp.float32):
    reason = f'no {library} GEMM for {a.dtype}'
  if reason is None and not runs_dtype(library, a.dtype):
    reason = "its bf16 GEMM does not run on this CPU (oneDNN 3.2's needs AVX-512)"
  if reason is not None:
    _notice(library, reason)
  return reason is None


def matmul(x_MK: jax.Array, w_KN: jax.Array, library: str = 'mkl') -> jax.Array:
  """x_MK @ w_KN in `library` (a key of LIBRARIES), differentiable, in the operands' dtype (bf16 or f32); XLA's
  dot in f32 accumulation (`acc32`; with a one-time notice) where the library cannot run or for other dtypes.
  'auto': this VJP where its backward's transposed products take oneDNN (`resolve`), else `acc32` alone."""
  runs = (resolve(library, x_MK.dtype, x_MK.size * w_KN.shape[1]) != 'xla' if library == 'auto'
          else _runs(library, x_MK, w_KN))
  return _matmul(x_MK, w_KN, library) if runs else acc32.matmul(x_MK, w_KN)


def dot(a: jax.Array, b: jax.Array, transa: bool = False, transb: bool = False, library: str = 'xla',
        f32: bool = False) -> jax.Array:
  """op(a) @ op(b) (2-D; op transposes where asked) accumulated in f32, returned in f32 or in a's dtype: by
  `library` where it runs, else XLA's dot (which hands bf16 x bf16 -> f32 to the CPU's bf16 dot units). No VJP:
  for code that writes its own backward (grouped_ffn). A transposed first operand is where the library pays
  most: x^T dy of 256 x 512 x 512 bf16 takes 0.5 ms in oneDNN, 1.3 ms in XLA's dot (README, Speed)."""
  library = resolve(library, a.dtype, a.size * (b.shape[0] if transb else b.shape[1]), transa or transb)
  if _runs(library, a, b):
    y = gemm_f32(a, b, transa, transb, library)
  else:
    y = jnp.matmul(a.T if transa else a, b.T if transb else b, preferred_element_type=jnp.float32)
  return y if f32 else y.astype(a.dtype)
