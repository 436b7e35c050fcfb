"""What does a model cost? Parameters (total / active, embedding / not), FLOPs per token and weight memory.

  python experiments/count.py --arch=moe --experts=8 --k=2          # readable table
  python experiments/count.py --arch=dense --d_model=256 --json     # one JSON object

Counts are read off the real module tree (built with nnx.eval_shape, nothing allocated) and checked against the
closed-form count from the config; a mismatch is a bug and stops the script.
"""

from __future__ import annotations

import json

from absl import flags

from slmjax import cli, counting

flags.DEFINE_boolean('json', False, 'Print one JSON object instead of a table.')
cli.define_model_flags()
FLAGS = flags.FLAGS


def format_table(name: str, row: dict) -> str:
  lines = [f'{name}']
  for key in ('total_params', 'active_params', 'embedding_params', 'total_non_embedding_params',
              'active_non_embedding_params', 'active_matmul_params'):
    lines.append(f'  {key:<30} {row[key]:>16,}')
  lines.append(f'  {"active_fraction":<30} {row["active_fraction"]:>16.3f}')
  lines.append(f'  {"train_flops_per_token":<30} {row["train_flops_per_token"]:>16,}  (seq_len {row["seq_len"]})')
  lines.append(f'  {"inference_flops_per_token":<30} {row["inference_flops_per_token"]:>16,}')
  for dtype, n_bytes in row['weight_bytes'].items():
    lines.append(f'  {"weights @ " + dtype:<30} {n_bytes / 2**20:>13,.2f} MiB')
  return '\n'.join(lines)


def main(argv):
  del argv
  cfg = cli.model_config_from_flags()
  counts = counting.module_counts(cfg)
  if counts != counting.analytic_counts(cfg):
    raise RuntimeError(f'module tree {counts} disagrees with analytic {counting.analytic_counts(cfg)}')
  row = counting.summary(cfg, FLAGS.seq_len, counts)
  if FLAGS.json:
    print(json.dumps({**row, 'config': cfg.to_dict()}))
  else:
    name = f'{FLAGS.arch} d_model={cfg.d_model} n_layers={cfg.n_layers}'
    if cfg.is_moe:
      name += f' experts={cfg.n_experts} top_k={cfg.top_k} d_expert={cfg.expert_size}'
    print(format_table(name, row))


if __name__ == '__main__':
  cli.run(main)
