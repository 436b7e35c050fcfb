"""Train one dense or MoE model on real text, offline by default; rerun the same command to resume.

  python experiments/train.py --arch=dense --steps=500 --out=runs/dense
  python experiments/train.py --arch=moe --experts=8 --k=2 --steps=500 --out=runs/moe
  python experiments/train.py --out=runs/dense --steps=1000      # continues runs/dense to step 1000
  python experiments/train.py --schedule=wsd --branches=0.25,0.5 --steps=800 --out=runs/wsd   # 3 token counts
  python experiments/train.py --init_from=SmolLM2-135M --eval_only      # an imported model's held-out loss
  python experiments/train.py --init_from=SmolLM2-135M --steps=200 --lr=3e-4 --out=runs/ft   # fine-tune it

The output directory holds config.json, metrics.jsonl (one JSON object per logged step), summary.json and
checkpoints/. Default data: the Python standard library source (see slmjax/data.py and README "Training").
--init_from takes a Hugging Face model directory or a run (experiments/convert.py): its architecture and weights,
and its tokenizer.json when it has one (losses then in nats per token of that tokenizer and in bits per byte);
only the runtime model flags (--dtype, --param_dtype, --seq_len, ...) may be given with it.
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import json
import math
import os
import sys

import jax
from absl import flags

from slmjax import checkpoint, cli, cost, distributed, sharding, train, wsd
from slmjax.convert import common, runs

flags.DEFINE_string('out', None, 'Run directory (created; resumed if it holds this run). Default: runs/<arch>.')
flags.DEFINE_boolean('mfu', True, 'Measure the matmul peak of this machine and report model FLOP utilisation.')
flags.DEFINE_boolean('json', False, 'Print the final metrics as one JSON object.')
flags.DEFINE_string('init_from', None, 'Start from this model: a Hugging Face directory (config.json + '
                    'safetensors) or a run directory; its architecture replaces the model flags.')
flags.DEFINE_boolean('eval_only', False, 'With --init_from: print its held-out loss on --data and stop.')
cli.define_model_flags()
cli.define_train_flags()
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  distributed.initialize()  # several processes (flags, SLURM, TPU slice): join them before touching devices
  init_state = None
  if FLAGS.init_from:
    model_cfg, init_state, tokenizer = imported_model()
    train_cfg = cli.train_config_from_flags(**({} if FLAGS['tokenizer'].present else {'tokenizer': tokenizer}))
  elif FLAGS.eval_only:
    raise ValueError('--eval_only evaluates an imported model: give --init_from=DIR')
  else:
    model_cfg = cli.model_config_from_flags()
    train_cfg = cli.train_config_from_flags()
  if FLAGS.eval_only:
    metrics = train.evaluate_only(model_cfg, train_cfg, init_state)
    print(json.dumps(metrics) if FLAGS.json else
          f'{FLAGS.init_from} on {train_cfg.data} ({metrics["eval_tokens"]:,} held-out tokens): '
          f'{metrics["eval_loss"]:.4f} nats/token' + (f', {metrics["eval_bpb"]:.4f} bits/byte' if 'eval_bpb' in metrics
                                                      else '') + f' (unigram {metrics["unigram_eval_loss"]:.4f})')
    return
  out = FLAGS.out or os.path.join('runs', FLAGS.arch)
  train_cfg = keep_stored_warmup(train_cfg, out)
  # Measured here, now, in the model's compute dtype: never a datasheet number.
  peak = cost.matmul_peak_flops(dtype=model_cfg.dtype) if FLAGS.mfu else None
  kwargs = dict(peak_flops=peak, mesh=sharding.make_mesh(FLAGS.mesh), tensorboard=FLAGS.tensorboard,
                log=print if jax.process_index() == 0 else None)
  try:
    if train_cfg.schedule == 'wsd':  # the stable trunk and its cooldown branches (slmjax/wsd.py)
      if init_state is not None:
        raise ValueError('--init_from with --schedule=wsd is not supported; use the cosine schedule')
      branches = wsd.train_wsd(model_cfg, train_cfg, out, **kwargs)
      for steps, branch in branches.items():
        print(f'wsd branch {steps} steps ({branch["tokens"]:,} tokens): held-out loss {branch["eval_loss"]:.4f}')
      summary = branches[train_cfg.steps]
    else:
      summary = train.train(model_cfg, train_cfg, out, init_from=init_state, **kwargs)
  except train.NonFiniteLossError as e:
    print(f'{os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_count() > 1:  # every process computed the same global loss: show it, so launchers can compare
    print(f'process {jax.process_index()}/{jax.process_count()}: final train loss {summary["train_loss"]!r}')
    if jax.process_index() != 0:
      return
  if FLAGS.json:
    print(json.dumps(summary))
    return
  line = f'done: step {summary["step"]}, train loss {summary["train_loss"]:.4f}'
  if 'eval_bpb' in summary:
    unigram_bpb = summary['unigram_eval_loss'] / math.log(2)
    line += f', held-out {summary["eval_bpb"]:.3f} bits/byte (unigram {unigram_bpb:.3f})'
  elif 'eval_loss' in summary:
    line += f', held-out loss {summary["eval_loss"]:.4f} (unigram {summary["unigram_eval_loss"]:.4f})'
  if 'tokens_per_s' in summary:
    line += f', {summary["tokens_per_s"]:,.0f} tokens/s'
  if 'mfu' in summary:
    line += f', MFU {summary["mfu"]:.1%} of a measured {summary["peak_flops_per_s"] / 1e9:.1f} GFLOP/s matmul peak'
  print(line)


def keep_stored_warmup(train_cfg, out: str):
  """Without --warmup, a run continued in `out` (a larger --steps) keeps the warmup it started with: the default
  follows --steps on short runs (steps // 10), and a changed warmup is not a run that can be resumed. Only a run
  with a checkpoint counts: one killed before its first holds nothing to continue."""
  if FLAGS['warmup'].present:
    return train_cfg
  for run in (out, os.path.join(out, wsd.TRUNK)):
    if checkpoint.latest_step(os.path.join(run, 'checkpoints')) is not None:
      with open(os.path.join(run, 'config.json')) as f:
        stored = json.load(f).get('train', {}).get('warmup')
      try:
        return train_cfg.replace(warmup=stored) if isinstance(stored, int) else train_cfg
      except ValueError:  # it does not fit the new --steps: the run's own check says what is wrong
        return train_cfg
  return train_cfg


def imported_model():
  """(ModelConfig, state, tokenizer path or '') of --init_from, with the runtime model flags applied."""
  fixed = cli.given_arch_flags()
  if fixed:
    raise ValueError(f'--{fixed[0]} cannot change the model --init_from={FLAGS.init_from}; only --'
                     f'{", --".join(cli.RUNTIME_FLAGS)} apply')
  cfg, state, info = runs.read_source(FLAGS.init_from)
  model_cfg = cli.apply_runtime_flags(cfg)
  if model_cfg != cfg:  # e.g. --param_dtype: the weights in the new dtype
    state = common.build_state(model_cfg, common.flat_params(state))
  return model_cfg, state, info.get('tokenizer', '')


if __name__ == '__main__':
  cli.run(main)
