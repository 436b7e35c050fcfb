"""Train one dense or MoE model on real text, offline by default; rerun the same command to resume.

  python experiments/train.py --arch=dense --steps=500 --out=runs/dense
  python experiments/train.py --arch=moe --experts=8 --k=2 --steps=500 --out=runs/moe
  python experiments/train.py --out=runs/dense --steps=1000      # continues runs/dense to step 1000
  python experiments/train.py --schedule=wsd --branches=0.25,0.5 --steps=800 --out=runs/wsd   # 3 token counts

The output directory holds config.json, metrics.jsonl (one JSON object per logged step), summary.json and
checkpoints/. Default data: the Python standard library source (see slmjax/data.py and README "Training").
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

from slmjax import cli, cost, distributed, sharding, train, wsd

flags.DEFINE_string('out', None, 'Run directory (created; resumed if it holds this run). Default: runs/<arch>.')
flags.DEFINE_boolean('mfu', True, 'Measure the matmul peak of this machine and report model FLOP utilisation.')
flags.DEFINE_boolean('json', False, 'Print the final metrics as one JSON object.')
cli.define_model_flags()
cli.define_train_flags()
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  distributed.initialize()  # several processes (flags, SLURM, TPU slice): join them before touching devices
  model_cfg = cli.model_config_from_flags()
  train_cfg = cli.train_config_from_flags()
  out = FLAGS.out or os.path.join('runs', FLAGS.arch)
  peak = cost.matmul_peak_flops() if FLAGS.mfu else None  # measured here, now: never a datasheet number
  kwargs = dict(peak_flops=peak, mesh=sharding.make_mesh(FLAGS.mesh), tensorboard=FLAGS.tensorboard,
                log=print if jax.process_index() == 0 else None)
  try:
    if train_cfg.schedule == 'wsd':  # the stable trunk and its cooldown branches (slmjax/wsd.py)
      branches = wsd.train_wsd(model_cfg, train_cfg, out, **kwargs)
      for steps, branch in branches.items():
        print(f'wsd branch {steps} steps ({branch["tokens"]:,} tokens): held-out loss {branch["eval_loss"]:.4f}')
      summary = branches[train_cfg.steps]
    else:
      summary = train.train(model_cfg, train_cfg, out, **kwargs)
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


if __name__ == '__main__':
  cli.run(main)
