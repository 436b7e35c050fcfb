"""Train a ladder of dense or MoE models and compare their scaling curves.

  python experiments/sweep.py --arch=dense                      # default CPU ladder, ~8 min on 2 cores
  python experiments/sweep.py --arch=moe --experts=8 --k=2      # the matched MoE ladder, same --out, ~8 min
  python experiments/sweep.py --arch=moe --ladder=32x2,64x2,128x4 --match=total --tokens_per_param=20
  python experiments/sweep.py --preset=deepseek-v3 --tokens=500000    # DeepSeek-V3's architecture, CPU widths
  python experiments/sweep.py --arch=moe --experts=4,8,16 --k=2        # three expert counts: the joint MoE law
  python experiments/sweep.py --arch=dense --schedule=wsd --branches=0.25,0.5   # 3 token counts per size: isoFLOPs

Writes <out>/results.jsonl (one row per finished run) and <out>/<run_id>/ (checkpoints, metrics), then over
every run in <out>: the report (table, router health, fits, the paired dense-vs-MoE comparison in
<out>/comparison.json, one closing line that states the answer) and the figures scaling.png, cost.png, gap.png
(with dense and MoE rows), isoflop.png (WSD branches) and joint.png (the joint law). Rerun the same command to
resume after an interruption.
Size flags (--d_model, --n_layers, --n_heads, --d_ff, --d_expert) come from the ladder; other architecture and
training flags are shared with train.py and count.py.
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import jax
from absl import flags

from slmjax import cli, distributed, presets, report, results, sharding, sweep

cli.define_model_flags(lists=('n_experts',))  # --experts=4,8,16: one matched ladder per expert count
cli.define_train_flags()
distributed.define_flags()
flags.DEFINE_string('ladder', 'cpu', f'Named ladder ({", ".join(sweep.LADDERS)}) or sizes D x L, e.g. 32x2,64x2.')
flags.DEFINE_enum('match', 'active', list(sweep.MATCHES), 'What an MoE rung holds equal to its dense rung.')
flags.DEFINE_float('tokens_per_param', None, 'Token budget per model as a multiple of its active non-embedding '
                   'parameters (instead of --tokens).')
flags.DEFINE_list('seeds', ['0', '1', '2', '3'], 'Seeds; every size is trained once per seed (four by default: the '
                  'dense-vs-MoE gaps get intervals 0.64x as wide as three seeds give; README, Fair defaults).')
flags.DEFINE_string('out', 'runs', 'Output directory, shared by sweeps of both architectures.')
flags.DEFINE_boolean('plot', True, 'Draw the plots at the end.')
flags.DEFINE_boolean('decode_cost', True, "Measure each rung's decode ms/token (batch 1 and 64) once it trains: "
                     '~5 s a rung on a 2-core CPU, ~35 s at 512x8 on an H200 (compiling two decode programs).')
flags.DEFINE_boolean('mfu', True, 'Measure the matmul peak of this machine (once per compute dtype, ~7 s on a '
                     '2-core CPU) and report each point\'s model FLOP utilisation.')
FLAGS = flags.FLAGS
FLAGS.set_default('tokens', 1_000_000)  # with 4 seeds: README, Fair defaults
FLAGS.set_default('seq_len', 128)
FLAGS.set_default('batch_size', 16)
FLAGS.set_default('checkpoint_every', 50)
FLAGS.set_default('eval_every', 0)
FLAGS.set_default('eval_batches', 16)
FLAGS.set_default('log_every', 25)
FLAGS.set_default('tensorboard', True)
FLAGS.set_default('capacity_factor', 0.0)  # sweeps train MoE dropless: see README, 'Fair defaults'
LADDER_FLAGS = ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'd_expert', 'steps')


def sweep_points() -> tuple[list, sweep.Budget]:
  for name in LADDER_FLAGS:
    if FLAGS[name].present:
      raise ValueError(f'--{name} is set by the sweep (ladder sizes and token budget); use --ladder=DxL,... '
                       f'or --tokens / --tokens_per_param instead')
  budget = sweep.Budget(tokens=None if FLAGS.tokens_per_param else FLAGS.tokens,
                        tokens_per_param=FLAGS.tokens_per_param)
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise ValueError(f'--seeds={",".join(FLAGS.seeds)} must be a comma-separated list of integers') from None
  if FLAGS.preset:  # a published architecture's own family, scaled down to CPU widths
    if FLAGS['ladder'].present:
      raise ValueError('--ladder does not apply with --preset (the preset family has its own widths)')
    cli.reject_arch_flags(FLAGS.preset)
    configs = [cli.apply_runtime_flags(cfg).replace(max_seq_len=max(cfg.max_seq_len, FLAGS.seq_len))
               for cfg in presets.preset_ladder(FLAGS.preset)]
  else:
    configs = [cfg for template in cli.model_configs_from_flags()
               for cfg in sweep.ladder(template, sweep.parse_sizes(FLAGS.ladder), template.n_experts, template.top_k,
                                       FLAGS.match)]
  return sweep.sweep_points(configs, budget, cli.train_fields_from_flags(), seeds), budget


def main(argv):
  del argv
  distributed.initialize()  # several processes (flags, SLURM, TPU slice): join them before touching devices
  points, budget = sweep_points()
  writer = jax.process_index() == 0
  sweep.run_sweep(points, budget, FLAGS.out, log=print if writer else (lambda line: None),
                  mesh=sharding.make_mesh(FLAGS.mesh), tensorboard=FLAGS.tensorboard,
                  measure_inference=FLAGS.decode_cost, measure_mfu=FLAGS.mfu)
  if not writer:
    return
  print()
  report.summarize(results.read_rows(FLAGS.out), FLAGS.out, plot=FLAGS.plot)


if __name__ == '__main__':
  cli.run(main)
