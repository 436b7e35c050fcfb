#!/usr/bin/env python3
"""Peer of experiments/bench_infer.py: Hugging Face `transformers` models with a static KV cache, greedy, on the tiny
Llama and Mixtral shapes of ../shared/tools/peer_hf.py, randomly initialised, float32, on CPU.

Runs in the peer venv (~/.hfpeer/bin/python), never imported by slmjax.

A round of a point (batch B, context T, new tokens N) is what slmjax's Generator does: one forward of the prompt
into a fresh `StaticCache` of T + N positions (timed: the prefill), then N forwards of one token per sequence at
cache positions T .. T + N - 1, each the argmax of the previous logits (timed together: the decode). Both are
timed directly, not as the difference of two `generate` calls (that difference of medians was noise-dominated
at small N), and `generate`'s own per-call work (logits processors, stopping criteria) is not in either figure.

  ~/.hfpeer/bin/python experiments/peer_hf_decode.py --models llama,mixtral-512 --batches 1,16 --contexts 64
  ~/.hfpeer/bin/python experiments/peer_hf_decode.py --serve     # what bench_infer.py --peer starts

The first form prints one JSON list (median of --repeats rounds after one warm-up) on its last stdout line.
`--serve` reads one JSON request a line on stdin ({"model", "batch", "context", "new_tokens"}) and answers each
with one round's {"prefill_s", "decode_s"} on one stdout line, so bench_infer.py can alternate rounds of slmjax
and of the peer on the same point (neither runs while the other is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Before torch starts its OpenMP threads: idle threads sleep instead of spinning at barriers. On this shared 2-core
# CPU the spinning threads fight each other and the machine's other processes: llama decode at batch 1 ran at 31
# tokens/s with the default policy, 137 passive, 201 with one thread (--threads 1), the same minute.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

COMMON = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=1024, tie_word_embeddings=False)
MOE = dict(num_local_experts=8, num_experts_per_tok=2)
MODELS = {  # peer_hf.py's llama and mixtral-512, and the dense model with the MoE's total FFN width
    'llama': ('llama', dict(intermediate_size=1024)),
    'mixtral-512': ('mixtral', dict(intermediate_size=512, **MOE)),
    'llama-4096': ('llama', dict(intermediate_size=4096)),
}


def build(name: str):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODELS)}')
  family, overrides = MODELS[name]
  torch.manual_seed(0)
  if family == 'llama':
    return LlamaForCausalLM(LlamaConfig(**COMMON, **overrides)).float().eval()
  return MixtralForCausalLM(MixtralConfig(**COMMON, **overrides)).float().eval()


def timed_round(model, prompt, new_tokens: int) -> dict:
  """One prefill of `prompt` ([B, T] token ids) into a fresh static cache and `new_tokens` greedy decode steps."""
  import torch
  from transformers import StaticCache
  batch, context = prompt.shape
  cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
  with torch.inference_mode():
    t0 = time.perf_counter()
    logits = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(context)).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for i in range(new_tokens):
      logits = model(token, past_key_values=cache, use_cache=True,
                     cache_position=torch.tensor([context + i])).logits
      token = logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
  assert token.shape == (batch, 1), token.shape
  return {'prefill_s': t1 - t0, 'decode_s': t2 - t1}


class Peer:
  """The models built so far and one fixed random prompt per (batch, context)."""

  def __init__(self):
    self.models, self.prompts = {}, {}

  def round(self, model: str, batch: int, context: int, new_tokens: int) -> dict:
    import torch
    if model not in self.models:
      self.models[model] = build(model)
    if (batch, context) not in self.prompts:
      self.prompts[batch, context] = torch.randint(0, COMMON['vocab_size'], (batch, context),
                                                   generator=torch.Generator().manual_seed(0))
    return timed_round(self.models[model], self.prompts[batch, context], new_tokens)


def point_row(peer: Peer, name: str, batch: int, context: int, new_tokens: int, repeats: int) -> dict:
  """Median prefill and decode of `repeats` rounds after one warm-up."""
  peer.round(name, batch, context, new_tokens)
  rounds = [peer.round(name, batch, context, new_tokens) for _ in range(repeats)]
  prefill, decode = (statistics.median(r[k] for r in rounds) for k in ('prefill_s', 'decode_s'))
  return dict(model=name, batch=batch, context=context, new_tokens=new_tokens, prefill_s=prefill,
              prefill_tokens_per_s=batch * context / prefill, decode_s=decode,
              decode_tokens_per_s=batch * new_tokens / decode, decode_ms_per_token=decode / new_tokens * 1e3)


def serve(peer: Peer) -> None:
  """One round per request line, one JSON answer line each (an error as {"error": ...}) until stdin closes."""
  import torch
  import transformers
  print(json.dumps({'torch_version': torch.__version__, 'transformers_version': transformers.__version__}),
        flush=True)
  for line in sys.stdin:
    try:
      q = json.loads(line)
      answer = peer.round(q['model'], int(q['batch']), int(q['context']), int(q['new_tokens']))
    except (ValueError, KeyError, RuntimeError) as e:
      answer = {'error': f'{type(e).__name__}: {e}'}
    print(json.dumps(answer), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  ints = lambda s: [int(x) for x in s.split(',') if x]  # noqa: E731
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--batches', type=ints, default=[1, 16])
  parser.add_argument('--contexts', type=ints, default=[64])
  parser.add_argument('--new-tokens', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=1, help='torch threads (intra-op)')
  parser.add_argument('--max-prefill-tokens', type=int, default=0, help='skip points with batch * context above')
  parser.add_argument('--serve', action='store_true', help='answer one-round requests on stdin (bench_infer.py)')
  args = parser.parse_args()
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  peer = Peer()
  if args.serve:
    return serve(peer)
  rows = []
  for name in args.models.split(','):
    if name not in MODELS:
      parser.error(f'unknown model {name!r}; known: {", ".join(MODELS)}')
    for context in args.contexts:
      for batch in args.batches:
        if args.max_prefill_tokens and batch * context > args.max_prefill_tokens:
          continue
        row = dict(point_row(peer, name, batch, context, args.new_tokens, args.repeats),
                   torch_version=torch.__version__, transformers_version=transformers.__version__)
        print(f'# peer {name} B={batch} T={context}: {row["decode_tokens_per_s"]:,.0f} tok/s', flush=True)
        rows.append(row)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
