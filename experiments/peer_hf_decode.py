#!/usr/bin/env python3
"""Peer of experiments/bench_infer.py: Hugging Face `transformers` `generate` (greedy, static KV cache) on the tiny
Llama and Mixtral shapes of ../shared/tools/peer_hf.py, randomly initialised, float32, on CPU.

Runs in the peer venv (~/.hfpeer/bin/python), never imported by slmjax; bench_infer.py --peer starts it as a
subprocess and reads the JSON list it prints on its last stdout line.

  ~/.hfpeer/bin/python experiments/peer_hf_decode.py --models llama,mixtral-512 --batches 1,16 --contexts 64

A point (batch B, context T, new tokens N) times generate(max_new_tokens=1) (the prefill and its one token) and
generate(max_new_tokens=N + 1), alternately, `--repeats` times after one warm-up of each; prefill = the first,
decode = the difference (N more forward steps, as slmjax's decode of N tokens after its prefill). The fastest call
of each is kept; a decode lost in the prefill's noise (under 10% of the call) is reported as None.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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
  family, overrides = MODELS[name]
  torch.manual_seed(0)
  if family == 'llama':
    return LlamaForCausalLM(LlamaConfig(**COMMON, **overrides)).float().eval()
  return MixtralForCausalLM(MixtralConfig(**COMMON, **overrides)).float().eval()


def measure(model, batch: int, context: int, new_tokens: int, repeats: int) -> dict:
  import torch
  prompt = torch.randint(0, COMMON['vocab_size'], (batch, context), generator=torch.Generator().manual_seed(0))
  mask = torch.ones_like(prompt)

  def run(n: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         cache_implementation='static', pad_token_id=0)
    assert out.shape == (batch, context + n), out.shape
    return time.perf_counter() - start

  with torch.inference_mode():
    run(1), run(new_tokens + 1)
    first, full = [], []
    for _ in range(repeats):
      first.append(run(1))
      full.append(run(new_tokens + 1))
  prefill, total = min(first), min(full)  # the least-disturbed calls: the difference of medians is too noisy
  decode = total - prefill
  if decode < 0.1 * total:  # the N steps vanished in the noise of the prefill: no figure rather than a wrong one
    decode = None
  return dict(batch=batch, context=context, new_tokens=new_tokens, prefill_s=prefill,
              prefill_tokens_per_s=batch * context / prefill, decode_s=decode,
              decode_tokens_per_s=batch * new_tokens / decode if decode else None,
              decode_ms_per_token=decode / new_tokens * 1e3 if decode else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  ints = lambda s: [int(x) for x in s.split(',') if x]  # noqa: E731
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--batches', type=ints, default=[1, 16])
  parser.add_argument('--contexts', type=ints, default=[64])
  parser.add_argument('--new-tokens', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--max-prefill-tokens', type=int, default=0, help='skip points with batch * context above')
  args = parser.parse_args()
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  rows = []
  for name in args.models.split(','):
    if name not in MODELS:
      parser.error(f'unknown model {name!r}; known: {", ".join(MODELS)}')
    model = build(name)
    for context in args.contexts:
      for batch in args.batches:
        if args.max_prefill_tokens and batch * context > args.max_prefill_tokens:
          continue
        row = dict(model=name, **measure(model, batch, context, args.new_tokens, args.repeats),
                   torch_version=torch.__version__, transformers_version=transformers.__version__)
        print(f'# peer {name} B={batch} T={context}: {row["decode_tokens_per_s"]} tok/s', flush=True)
        rows.append(row)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
