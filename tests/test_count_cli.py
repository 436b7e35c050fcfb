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
                         (('--arch=mlp',), 'value should be one of'),
                         (('--seq_len=0',), '--seq_len=0 must be positive'),
                         (('--preset=all', '--mesh=expert:8'), 'qwen1.5-moe-a2.7b: --mesh axis expert:8 does not '
                                                               'divide the expert dimension (60)')]:
    result = run(*flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_kv_cache_bytes_and_fit_with_them():
  result = run('--preset=deepseek-v3', '--context=4096', '--batch=2', '--json')
  assert result.returncode == 0, result.stderr
  row = json.loads(result.stdout)
  assert row['attention_kind'] == 'mla'
  assert row['kv_cache_bytes_per_token'] == 61 * (512 + 64) * 2  # DeepSeek-V3 caches the latent + rotary key, bf16
  assert row['kv_cache_bytes'] == row['kv_cache_bytes_per_token'] * 4096 * 2
  result = run('--preset=mixtral-8x7b', '--context=131072', '--batch=16', '--json')
  assert result.returncode == 0, result.stderr
  row = json.loads(result.stdout)
  # 32 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes = 131 KB/token; x 2M tokens = 275 GB: no longer one GPU
  assert (row['attention_kind'], row['kv_cache_bytes']) == ('gqa', 32 * 8 * 128 * 2 * 2 * 131072 * 16)
  assert row['smallest_device']['int4'] == 'gpu-80GB' and row['smallest_device_with_kv']['int4'] == 'node-8x80GB'
  assert run('--batch=0').stderr.strip().splitlines()[-1].endswith('--batch and --context must be >= 1, got 0 and None')
