"""What the tests of slmjax's own FFI handlers share (tests/test_fused_swiglu.py, tests/test_attention_call.py)."""

import pytest


def built_in_temp_cache(tmp_path_factory, load, what: str):
  """A module fixture's body: `load` builds the handlers into a temporary cache (not ~) unless this process has
  them already; the module is skipped where this machine cannot build them."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('SLMJAX_CACHE', str(tmp_path_factory.mktemp('cache')))
    if (reason := load()) is not None:
      pytest.skip(f'no {what} here: {reason}')
    yield
