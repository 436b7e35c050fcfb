"""Measured inference cost of one model: prefill and decode speed of `slmjax.generate.Generator`, and the memory
the weights, the KV cache and the compiled decode program hold, next to the figures `slmjax.counting` computes.

A point is (batch B, context T, new tokens N): a random prompt of T tokens per sequence is prefilled into a
cache of T + N positions, then N tokens are decoded greedily in one compiled scan. Decode tokens/s = B * N /
decode seconds; ms per token = decode seconds / N (one step, every sequence advancing by one token). Prefill and
decode are timed interleaved (a fresh prefill before each decode, since the decode donates its cache), the median
of `repeats` kept; `interleave` (e.g. the peer's round of the same point, experiments/bench_infer.py --peer) runs
after every round, so both see the same machine load. Memory: weights and KV cache summed from the real
arrays; `decode_peak_bytes` from XLA's memory analysis of the compiled decode (arguments + outputs +
temporaries - donated aliases).

Why it matters: a decode step of B sequences touches up to min(E, B k) experts, so "MoE speed follows active
parameters" holds at small B and fails as B grows; `crossovers` finds, from measured rows, the batch where the
MoE's tokens/s line crosses a dense one.

Shape letters: slmjax/shapes.py (here B batch, T prompt positions, N new tokens).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax import cost, counting
from slmjax.config import ModelConfig, SamplingConfig
from slmjax.generate import Generator
from slmjax.model import Transformer, create_model, init_cache

GREEDY = SamplingConfig(temperature=0.0)


def measure_point(model: Transformer, batch: int, context: int, new_tokens: int, repeats: int = 3,
                  seed: int = 0, interleave: Callable[[], dict] | None = None) -> dict:
  """Prefill / decode speed and measured vs computed memory of `model` at one (batch, context, new tokens).

  The row keeps every timed round (`prefill_s_rounds`, `decode_s_rounds`) and, with `interleave`, what it
  returned after each of them (`interleaved`; it also runs once after the warm-up round)."""
  cfg = model.cfg
  if context < 1 or new_tokens < 1:
    raise ValueError(f'context and new_tokens must be >= 1, got {context} and {new_tokens}')
  gen = Generator(model, batch, context + new_tokens, GREEDY)
  prompt_BT = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, context), np.int32))
  start, key = jnp.int32(context), jax.random.key(seed)
  caches, logits_BV = cost.block(gen.prefill(gen.state, prompt_BT))
  kv_bytes = cost.tree_bytes(caches)
  decode = gen.decode.lower(gen.state, caches, logits_BV, start, key, new_tokens).compile()  # compiled once
  memory = cost.program_memory(decode)
  prefill_s, decode_s, interleaved = [], [], []
  for _ in range(repeats + 1):  # the first round compiles
    t0 = time.perf_counter()
    caches, logits_BV = cost.block(gen.prefill(gen.state, prompt_BT))
    t1 = time.perf_counter()
    cost.block(decode(gen.state, caches, logits_BV, start, key))
    t2 = time.perf_counter()
    prefill_s.append(t1 - t0)
    decode_s.append(t2 - t1)
    if interleave:
      interleaved.append(interleave())
  prefill_time, decode_time = statistics.median(prefill_s[1:]), statistics.median(decode_s[1:])
  counts = counting.analytic_counts(cfg)
  return {
      'batch': batch, 'context': context, 'new_tokens': new_tokens,
      'prefill_s_rounds': prefill_s[1:], 'decode_s_rounds': decode_s[1:],
      **({'interleaved': interleaved[1:]} if interleave else {}),
      'prefill_s': prefill_time, 'prefill_tokens_per_s': batch * context / prefill_time,
      'decode_s': decode_time, 'decode_tokens_per_s': batch * new_tokens / decode_time,
      'decode_ms_per_token': decode_time / new_tokens * 1e3,
      'weight_bytes': cost.tree_bytes(nnx.state(model, nnx.Param)),
      'weight_bytes_computed': int(counts.total * counting.BYTES_PER_PARAM[cfg.param_dtype]),
      'kv_cache_bytes': kv_bytes,
      'kv_cache_bytes_computed': counting.kv_cache_bytes(cfg, context + new_tokens, batch),
      'kv_cache_bytes_per_token': counting.kv_cache_bytes_per_token(cfg),
      'decode_peak_bytes': memory['peak_bytes'] if memory else None,
      'decode_temp_bytes': memory.get('temp_size_in_bytes') if memory else None,
  }


def model_facts(cfg: ModelConfig) -> dict:
  """What a row says about the model it measured."""
  counts = counting.analytic_counts(cfg)
  return {'arch': 'moe' if cfg.is_moe else 'dense', 'n_experts': cfg.n_experts,
          'top_k': cfg.top_k if cfg.is_moe else 0, 'd_model': cfg.d_model, 'n_layers': cfg.n_layers,
          'ffn_size': cfg.ffn_size, 'total_params': counts.total, 'active_params': counts.active,
          'dtype': cfg.dtype, 'platform': jax.default_backend(), 'jax_version': jax.__version__}


def sweep(models: dict[str, ModelConfig], batches, contexts, new_tokens: int, repeats: int = 3,
          max_prefill_tokens: int | None = None, log=None,
          interleave: Callable[[str, int, int, int], dict] | None = None) -> list[dict]:
  """`measure_point` rows of every model at every (batch, context); points whose prompt tokens B * T exceed
  `max_prefill_tokens` are skipped (prefill cost grows with B T: at batch 256 a long context takes minutes on a
  CPU). `interleave(name, batch, context, new_tokens)` runs after each round of that point (`measure_point`)."""
  rows = []
  for name, cfg in models.items():
    model = create_model(cfg)
    for context in contexts:
      for batch in batches:
        if max_prefill_tokens and batch * context > max_prefill_tokens:
          continue
        between = interleave and functools.partial(interleave, name, batch, context, new_tokens)
        row = {'model': name, **model_facts(cfg),
               **measure_point(model, batch, context, new_tokens, repeats, interleave=between)}
        rows.append(row)
        if log:
          log(f'{name:<14} B={batch:<4} T={context:<5} decode {row["decode_tokens_per_s"]:>10,.0f} tok/s '
              f'({row["decode_ms_per_token"]:.2f} ms/token), prefill {row["prefill_tokens_per_s"]:>10,.0f} tok/s')
  return rows


def crossovers(rows: list[dict], moe: str, dense: str, key: str = 'decode_tokens_per_s') -> list[dict]:
  """Per context: the batch where `moe`'s line of `key` against batch crosses `dense`'s (log-log interpolation
  between the two measured batches around the sign change of log(moe / dense)); `batch` None when it does not
  cross in the measured range, with `moe_faster` saying which side it stays on."""
  out = []
  for context in sorted({r['context'] for r in rows}):
    line = lambda name: {r['batch']: r[key] for r in rows if r['model'] == name and r['context'] == context}
    a, b = line(moe), line(dense)
    batches = sorted(set(a) & set(b))
    if not batches:
      continue
    log_ratio = [math.log(a[x] / b[x]) for x in batches]
    found = None
    for (x0, r0), (x1, r1) in zip(zip(batches, log_ratio), zip(batches[1:], log_ratio[1:])):
      if r0 == 0:
        found = x0
        break
      if r0 * r1 < 0:
        f = r0 / (r0 - r1)
        found = math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0)))
        break
    out.append({'moe': moe, 'dense': dense, 'context': context, 'batch': found,
                'moe_faster_at_smallest': log_ratio[0] > 0, 'moe_faster_at_largest': log_ratio[-1] > 0,
                'ratio_by_batch': {x: math.exp(r) for x, r in zip(batches, log_ratio)}})
  return out


def rung_cost(cfg: ModelConfig, context: int, large_batch: int = 64, steps: int = 4, repeats: int = 3) -> dict:
  """A sweep rung's inference cost, cheap enough to measure after every run (one decode compile per batch, no
  prefill): decode ms/token at batch 1 and at `large_batch` over a cache of `context` positions, KV-cache bytes
  per token, and the compiled decode's peak memory at the large batch. Timed with random weights: the decode's
  cost follows the shapes (a step gathers k experts per token or runs every expert), not the trained values."""
  model = nnx.jit(create_model, static_argnums=0)(cfg)  # one compiled init, not an eager op per parameter
  steps = min(steps, context - 1)
  row = {'kv_cache_bytes_per_token': counting.kv_cache_bytes_per_token(cfg), 'decode_context': context,
         'decode_large_batch': large_batch}
  for batch, suffix in ((1, 'b1'), (large_batch, 'large')):
    gen = Generator(model, batch, context, GREEDY)
    logits_BV = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    start, key = jnp.int32(context - steps), jax.random.key(0)
    caches = init_cache(cfg, batch, context)
    decode = gen.decode.lower(gen.state, caches, logits_BV, start, key, steps).compile()
    times = []
    for _ in range(repeats + 1):  # the first call warms up
      caches = cost.block(init_cache(cfg, batch, context))  # a fresh cache: the decode donates its input
      t0 = time.perf_counter()
      cost.block(decode(gen.state, caches, logits_BV, start, key))
      times.append(time.perf_counter() - t0)
    row[f'decode_ms_per_token_{suffix}'] = statistics.median(times[1:]) / steps * 1e3
    if suffix == 'large':
      memory = cost.program_memory(decode)
      row['decode_peak_bytes'] = memory['peak_bytes'] if memory else None
  return row
