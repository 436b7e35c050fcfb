"""The PyTorch peer of experiments/bench_train.py: Hugging Face Llama / Mixtral training steps, eager, on CPU.

Runs in the peer's own venv (torch + transformers; slmjax never imports torch), as a subprocess of bench_train.py:

  ~/.hfpeer/bin/python experiments/peer_torch.py --models=llama --batch=16 --seq=256 --steps=10 --warmup=3
  ~/.hfpeer/bin/python experiments/peer_torch.py --models=llama --autocast=bfloat16   # bf16 compute

and prints one JSON list of rows (one per model) as its last stdout line. Copied from ../shared/tools/peer_hf.py
(its eager rows only), so the project owns the peer it compares against. One step: forward on a fixed-seed random
batch with labels = inputs (transformers shifts them), cross-entropy (+ 0.01 x the load-balancing loss for
Mixtral), backward, fused AdamW at 3e-4 (what the transformers Trainer picks), zero_grad. `--autocast=bfloat16`
runs forward and loss under `torch.autocast('cpu', torch.bfloat16)`: matmuls in bf16, fp32 master weights, the
backward follows the forward's dtypes (PyTorch's documented mixed-precision recipe). The median of `--steps` steps
is reported. FLOPs follow bench_train.py's convention: tokens * (6 * matmul parameters a token uses +
6 * layers * seq * d_model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

COMMON = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=512, tie_word_embeddings=False)
MOE = dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01, output_router_logits=True)
MODELS = {  # name -> (config class, model class, overrides); bench_train.PEER_MODELS holds the same shapes
    'llama': (LlamaConfig, LlamaForCausalLM, dict(intermediate_size=1024)),
    'mixtral-512': (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=512, **MOE)),
    'mixtral-1024': (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=1024, **MOE)),
}
AUTOCAST = {'off': None, 'bfloat16': torch.bfloat16}


def build_model(name: str) -> torch.nn.Module:
  config_cls, model_cls, overrides = MODELS[name]
  torch.manual_seed(0)
  return model_cls(config_cls(**COMMON, **overrides)).float().train()


def matmul_params(model: torch.nn.Module) -> int:
  """Matmul parameters a token uses: all 2-D weights but the input embedding, experts counted k / n."""
  cfg = model.config
  share = getattr(cfg, 'num_experts_per_tok', 1) / getattr(cfg, 'num_local_experts', 1)
  total = 0.0
  for name, p in model.named_parameters():
    if p.ndim > 1 and 'embed_tokens' not in name:
      total += p.numel() * (share if '.experts.' in name else 1.0)
  return int(total)


def time_training(name: str, args) -> dict:
  """Warm-up then timed training steps of one model; its result row."""
  model = build_model(name)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
  gen = torch.Generator().manual_seed(1)
  batches = [torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
             for _ in range(args.warmup + args.steps)]
  dtype = AUTOCAST[args.autocast]
  times, losses = [], []
  for i, x in enumerate(batches):
    t0 = time.perf_counter()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
      loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
    losses.append(loss.item())
  step_s = statistics.median(times)
  tokens = args.batch * args.seq
  cfg = model.config
  flops = tokens * (6 * matmul_params(model) + 6 * cfg.num_hidden_layers * args.seq * cfg.hidden_size)
  return dict(model=name, autocast=args.autocast, step_time_s=step_s, step_time_min_s=min(times),
              tokens_per_s=tokens / step_s, flops_per_step=flops, achieved_gflops=flops / step_s / 1e9,
              first_loss=losses[0], last_loss=losses[-1], batch=args.batch, seq=args.seq, threads=args.threads,
              torch=torch.__version__)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=','.join(MODELS), help=f'comma-separated subset of {", ".join(MODELS)}')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  p.add_argument('--autocast', choices=list(AUTOCAST), default='off', help='bfloat16: torch.autocast on CPU')
  args = p.parse_args()
  names = [m for m in args.models.split(',') if m]
  unknown = [m for m in names if m not in MODELS]
  if unknown:
    p.error(f'--models: unknown {unknown}; known: {", ".join(MODELS)}')
  if args.seq > COMMON['max_position_embeddings']:
    p.error(f'--seq must be <= {COMMON["max_position_embeddings"]}')
  torch.set_num_threads(args.threads)
  print(json.dumps([time_training(name, args) for name in names]))


if __name__ == '__main__':
  main()
