"""What the tests of slmjax's own FFI handlers share (tests/test_fused_swiglu.py, test_attention_call.py,
test_gather_sum.py, test_router_call.py, test_optim.py)."""

import pytest


def built_in_temp_cache(tmp_path_factory, load, what: str):
  """A module fixture's body: `load` builds the handlers into a temporary cache (not ~) unless this process has
  them already; the module is skipped where this machine cannot build them."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('SLMJAX_CACHE', str(tmp_path_factory.mktemp('cache')))
    if (reason := load()) is not None:
      pytest.skip(f'no {what} here: {reason}')
    yield


def floor_call_fixtures(module, what: str):
  """The two autouse fixtures of a call's tests whose module has a MIN_F32_ELEMENTS floor (gather_sum, router):
  the handlers built in a temporary cache (the test module skipped where they cannot build), and the calls taken
  for the tests' small f32 operands too. Assign both to module-level names."""
  @pytest.fixture(scope='module', autouse=True)
  def built(tmp_path_factory):
    yield from built_in_temp_cache(tmp_path_factory, module.load, what)

  @pytest.fixture(autouse=True)
  def small_f32_taken(monkeypatch):
    monkeypatch.setattr(module, 'MIN_F32_ELEMENTS', 0)

  return built, small_f32_taken
