"""decode_cost: measured memory equals the computed figures, speeds are consistent, the crossover is found."""

import pytest

from slmjax import counting, decode_cost
from slmjax.config import ModelConfig
from slmjax.model import create_model

TINY = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)


@pytest.mark.parametrize('shape', [dict(d_ff=32), dict(n_experts=4, top_k=2, d_expert=16, capacity_factor=None),
                                   dict(attention='mla', kv_lora_rank=8, qk_rope_dim=4, v_head_dim=8, d_ff=32)])
def test_point_memory_matches_counting_and_speeds_agree(shape):
  cfg = ModelConfig(**TINY, **shape)
  row = decode_cost.measure_point(create_model(cfg), batch=2, context=5, new_tokens=3, repeats=1)
  assert row['weight_bytes'] == row['weight_bytes_computed'] == 4 * counting.analytic_counts(cfg).total
  assert row['kv_cache_bytes'] == row['kv_cache_bytes_computed'] == counting.kv_cache_bytes(cfg, 8, 2)
  assert row['decode_tokens_per_s'] == pytest.approx(2 * 3 / row['decode_s'])
  assert row['decode_ms_per_token'] == pytest.approx(row['decode_s'] / 3 * 1e3)
  assert row['prefill_tokens_per_s'] == pytest.approx(2 * 5 / row['prefill_s'])
  assert row['decode_peak_bytes'] >= row['weight_bytes'] + row['kv_cache_bytes']


def test_crossover_interpolates_in_log_batch():
  rows = [{'model': m, 'context': 8, 'batch': b, 'decode_tokens_per_s': v}
          for m, line in (('moe', {1: 200, 4: 400, 16: 800}), ('dense', {1: 100, 4: 400, 16: 1600}))
          for b, v in line.items()]
  rows += [{'model': 'dense-big', 'context': 8, 'batch': b, 'decode_tokens_per_s': 10 * b} for b in (1, 4, 16)]
  cross, = decode_cost.crossovers(rows, 'moe', 'dense')
  assert cross['batch'] == 4 and cross['moe_faster_at_smallest'] and not cross['moe_faster_at_largest']
  never, = decode_cost.crossovers(rows, 'moe', 'dense-big')
  assert never['batch'] is None and never['moe_faster_at_largest']
  rows[1]['decode_tokens_per_s'] = 300  # MoE now below dense at 4: crossing between 1 and 4, at 2 (log midpoint)
  assert decode_cost.crossovers(rows, 'moe', 'dense')[0]['batch'] == pytest.approx(2 ** (2 * 0.6931 / (0.6931 + 0.2877)), rel=1e-3)


def test_interleave_runs_after_every_round():
  """bench_infer --peer: the peer's round follows each slmjax round (the warm-up's too); the row keeps the timed
  rounds of both, and its medians are those of its own rounds."""
  calls = []
  row = decode_cost.measure_point(create_model(ModelConfig(**TINY, d_ff=32)), batch=1, context=4, new_tokens=2,
                                  repeats=3, interleave=lambda: calls.append(len(calls)) or {'round': len(calls)})
  assert calls == [0, 1, 2, 3] and row['interleaved'] == [{'round': 2}, {'round': 3}, {'round': 4}]
  assert len(row['decode_s_rounds']) == 3 and row['decode_s'] == sorted(row['decode_s_rounds'])[1]
