"""experiments/count.py: JSON keys, correct numbers, and one-line errors on bad flags."""

import json
import pathlib
import subprocess
import sys

from slmjax import counting
from slmjax.config import ModelConfig

SCRIPT = pathlib.Path(__file__).parent.parent / 'experiments' / 'count.py'


def run(*flags):
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120)


def test_json_counts_match_the_library():
  result = run('--arch=moe', '--experts=8', '--k=2', '--d_model=64', '--n_layers=2', '--json')
  assert result.returncode == 0, result.stderr
  row = json.loads(result.stdout)
  cfg = ModelConfig(d_model=64, n_layers=2, n_experts=8, top_k=2)
  assert row['config'] == cfg.to_dict()
  expected = counting.summary(cfg)
  for key in ('total_params', 'active_params', 'total_non_embedding_params', 'active_non_embedding_params',
              'train_flops_per_token', 'weight_bytes'):
    assert row[key] == expected[key], key


def test_bad_flags_give_one_line_errors():
  for flags, message in [(('--arch=moe', '--experts=2', '--k=3'), 'top_k=3 must be between 1 and n_experts=2'),
                         (('--arch=moe', '--experts=0'), '--experts=0'),
                         (('--arch=mlp',), 'value should be one of')]:
    result = run(*flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
