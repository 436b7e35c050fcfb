"""One JAX persistent compilation cache for the whole test session, in-process and in the subprocesses tests run.

Many tests build the same small models afresh (new jit closures, same programs), and the CLI tests start Python
processes that compile them again; the cache turns those recompiles into disk reads (a train.py run: 17 -> 8 s
here). Set before any test module imports jax, so jax reads it at import; the environment carries it into
subprocesses. A cache dir the caller already set (JAX_COMPILATION_CACHE_DIR) is used as is.

Tests also compile at LLVM optimisation level 0 (`--xla_backend_optimization_level=0`, appended to XLA_FLAGS):
their programs are tiny and compiled once or twice each, so compile time is most of a test's time
(tests/test_generate.py: 78 -> 51 s). The programs are the same; results may differ from level 2's in the last
bits, and tests that compare two programs compare programs built alike. xdist workers inherit the flag. Set
SLMJAX_TEST_XLA_OPT=1 to test the optimised code the library runs by default.
"""

import os
import shutil
import tempfile

_OWN_CACHE = None if os.environ.get('JAX_COMPILATION_CACHE_DIR') else tempfile.mkdtemp(prefix='slmjax-test-jit-')
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
_LEVEL_0 = '--xla_backend_optimization_level=0'
if os.environ.get('SLMJAX_TEST_XLA_OPT') != '1' and _LEVEL_0 not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL_0}".strip()


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
