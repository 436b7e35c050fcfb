"""The parity checks every converted family passes (tests/test_convert.py, tests/test_convert_moe.py):
logits equal transformers' stored ones, export reproduces the checkpoint bit for bit, counts equal
slmjax.counting. Each check returns what it measured, so a test can record it."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax import convert, counting
from slmjax.convert import hf_io

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'hf'
SCRIPTS = pathlib.Path(__file__).parent / 'scripts'
TOLERANCE = 1e-4  # max abs logit difference, float32
DIFFS_FILE = 'parity.jsonl'  # under pytest's tmp_path base: one row per checked family


def fixture(name: str) -> pathlib.Path:
  return FIXTURES / name


def logits_diff(directory: pathlib.Path, tokens_BT: np.ndarray | None = None,
                reference_BTV: np.ndarray | None = None) -> float:
  """Max abs difference between the imported model's float32 logits and transformers' (logits.npy on
  tokens.npy unless given)."""
  tokens_BT = np.load(directory / 'tokens.npy') if tokens_BT is None else tokens_BT
  reference_BTV = np.load(directory / 'logits.npy') if reference_BTV is None else reference_BTV
  graph, state = nnx.split(convert.load_hf(directory))
  forward = jax.jit(lambda state, tokens_BT: nnx.merge(graph, state)(tokens_BT)[0])  # eager dispatch: seconds
  logits_BTV = forward(state, jnp.asarray(tokens_BT))
  assert logits_BTV.shape == reference_BTV.shape
  return float(np.max(np.abs(np.asarray(logits_BTV) - reference_BTV)))


def export_matches(directory: pathlib.Path, out: pathlib.Path) -> list[str]:
  """Import `directory`, export into `out`, and compare every tensor with the original: same names, dtypes,
  shapes and bytes. Returns the tensor names compared; raises AssertionError naming the first difference."""
  cfg, state = convert.from_hf(directory)
  hf = json.loads((directory / 'config.json').read_text())
  convert.to_hf(cfg, state, out, model_type=hf['model_type'])
  _, original = hf_io.read_model_dir(directory)
  _, exported = hf_io.read_model_dir(out)
  if cfg.tie_embeddings:
    original.pop('lm_head.weight', None)
  assert sorted(exported) == sorted(original), (sorted(set(exported) ^ set(original)))
  for name, value in original.items():
    mine = exported[name]
    assert mine.dtype == value.dtype and mine.shape == value.shape, (name, mine.dtype, value.dtype)
    assert np.asarray(mine).tobytes() == np.asarray(value).tobytes(), f'{name} differs'
  # The exported config reads back as the same model.
  assert convert.config_from_hf(json.loads((out / 'config.json').read_text())) == cfg.replace(param_dtype='float32')
  return sorted(original)


def counts_match(directory: pathlib.Path) -> int:
  """The imported model's stored parameters equal slmjax.counting's analytic total; returns it."""
  _, tensors = hf_io.read_model_dir(directory)
  cfg, state = convert.from_hf(directory)
  stored = sum(v.size for v in convert.common.flat_params(state).values())
  analytic = counting.analytic_counts(cfg)
  assert analytic == counting.module_counts(cfg)
  assert stored == analytic.total, (stored, analytic.total)
  hf_total = sum(t.size for n, t in tensors.items() if not (cfg.tie_embeddings and n == 'lm_head.weight'))
  assert hf_total == analytic.total, (hf_total, analytic.total)
  return analytic.total


def record(tmp_path_factory, row: dict) -> None:
  """Append one parity row (family, max abs diff, ...) to parity.jsonl under pytest's base temp directory,
  and print it (shown with -s / -rA)."""
  path = tmp_path_factory.getbasetemp() / DIFFS_FILE
  with path.open('a') as f:
    f.write(json.dumps(row) + '\n')
  print(json.dumps(row))


def live_maker():
  """tests/scripts/make_hf_fixtures.py as a module (`build`, `save`, `logits_of`); needs torch and transformers."""
  if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
  import make_hf_fixtures
  return make_hf_fixtures
