"""What does a model cost? Parameters (total / active, embedding / not), FLOPs per token, weight memory, and the
smallest device that holds the weights, alone and with the KV cache of --batch sequences of --context tokens.

  python experiments/count.py --arch=moe --experts=8 --k=2          # readable table
  python experiments/count.py --arch=dense --d_model=256 --json     # one JSON object
  python experiments/count.py --preset=mixtral-8x7b                 # a published model (slmjax/presets.py)
  python experiments/count.py --preset=all                          # one row per preset; --json: a JSON list
  python experiments/count.py --preset=deepseek-v3 --scale_down     # the same architecture at CPU size
  python experiments/count.py --preset=all --context=32768 --batch=8  # KV cache (MLA vs GQA vs MHA) and fit

Counts are read off the real module tree (built with nnx.eval_shape, nothing allocated) and checked against the
closed-form count from the config; a mismatch is a bug and stops the script. FLOPs per token are at --seq_len
(a preset's max_seq_len, 4096, unless --seq_len is given).
"""

from __future__ import annotations

import json
import math
import textwrap

from absl import flags

from slmjax import cli, counting, presets, sharding

flags.DEFINE_string('mesh', '', 'A mesh such as expert:8 or data:2,fsdp:4: also print the weight bytes one '
                    'device holds on it (slmjax.axes rules).')
flags.DEFINE_integer('context', None, 'Tokens per sequence the KV cache holds (default: --seq_len, a preset\'s '
                     'max_seq_len): its bytes and the device fit with it.')
flags.DEFINE_integer('batch', 1, 'Sequences the KV cache holds.')
flags.DEFINE_boolean('json', False, 'Print one JSON object (a list for --preset=all) instead of a table.')
cli.define_model_flags()
FLAGS = flags.FLAGS
FIT_NOTE = (f'device fit: weights only, which may fill {counting.FIT_FRACTION:.0%} of the memory (the rest for '
            'activations, KV cache, runtime); GB = 1e9 bytes; ladder: '
            + ', '.join(f'{name} {capacity / 1e9:g} GB' for name, capacity in counting.DEVICE_LADDER)
            + f'; "with KV": weights + the KV cache in {counting.KV_FIT_DTYPE}')


def human(n: float) -> str:
  """134.5M, 46.70B, 1.026T: four significant digits."""
  for unit, scale in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.4g}{unit}'
  return str(int(n))


def human_bytes(n: float) -> str:
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if n >= scale:
      return f'{n / scale:,.2f} {unit}'
  return f'{n:g} B'


def mesh_sizes() -> dict[str, int] | None:
  return sharding.hypothetical_mesh(FLAGS.mesh) if FLAGS.mesh else None


def format_table(name: str, row: dict) -> str:
  lines = [f'{name}']
  for key in ('total_params', 'active_params', 'embedding_params', 'total_non_embedding_params',
              'active_non_embedding_params', 'active_matmul_params'):
    lines.append(f'  {key:<30} {row[key]:>20,}  ({human(row[key])})')
  lines.append(f'  {"active_fraction":<30} {row["active_fraction"]:>20.4f}')
  lines.append(f'  {"train_flops_per_token":<30} {row["train_flops_per_token"]:>20,}  (seq_len {row["seq_len"]})')
  lines.append(f'  {"inference_flops_per_token":<30} {row["inference_flops_per_token"]:>20,}')
  lines.append('  where (total / active)')
  for component, n in row['breakdown'].items():
    if n['total']:
      lines.append(f'    {component:<28} {human(n["total"]):>10} / {human(n["active"])}')
  for dtype, n_bytes in row['weight_bytes'].items():
    lines.append(f'  {"weights @ " + dtype:<30} {human_bytes(n_bytes):>20}')
  for dtype, n_bytes in row.get('weight_bytes_per_device', {}).items():
    devices = math.prod(row['mesh'].values())
    lines.append(f'  {"weights/device @ " + dtype:<30} {human_bytes(n_bytes):>20}  (mesh of {devices}: {FLAGS.mesh})')
  lines.append(f'  {"kv_cache_bytes_per_token":<30} {row["kv_cache_bytes_per_token"]:>20,}  '
               f'({row["attention_kind"]}, {row["kv_cache_dtype"]})')
  lines.append(f'  {"kv_cache_bytes":<30} {human_bytes(row["kv_cache_bytes"]):>20}  '
               f'(context {row["kv_cache_context"]:,} x batch {row["kv_cache_batch"]})')
  for dtype, device in row['smallest_device'].items():
    lines.append(f'  {"smallest device @ " + dtype:<30} {device:>20}  (with KV: {row["smallest_device_with_kv"][dtype]})')
  lines.append(f'  ({FIT_NOTE})')
  return '\n'.join(lines)


def format_all(rows: list[dict]) -> str:
  head = (f'{"preset":<19} {"total":>8} {"active":>8} {"active%":>7} {"bf16 GB":>8}  '
          f'{"fits@int4":<12}{"fits@int8":<12}{"fits@bf16":<12}{"attn":<5}{"KV KB/tok":>10} {"KV GB":>8}  '
          f'{"with KV: int4":<14}{"int8":<12}{"bf16"}')
  lines = [head, '-' * len(head)]
  for row in rows:
    fits, kv = row['smallest_device'], row['smallest_device_with_kv']
    lines.append(f'{row["preset"]:<19} {human(row["total_params"]):>8} {human(row["active_params"]):>8} '
                 f'{row["active_fraction"]:>7.1%} {row["weight_bytes"]["bfloat16"] / 1e9:>8.2f}  '
                 f'{fits["int4"]:<12}{fits["int8"]:<12}{fits["bfloat16"]:<12}{row["attention_kind"]:<5}'
                 f'{row["kv_cache_bytes_per_token"] / 1e3:>10.1f} {row["kv_cache_bytes"] / 1e9:>8.2f}  '
                 f'{kv["int4"]:<14}{kv["int8"]:<12}{kv["bfloat16"]}'.rstrip())
  contexts = sorted({row['kv_cache_context'] for row in rows})
  tokens = (f'{FLAGS.context:,}' if FLAGS.context is not None else
            f"{contexts[0]:,} (every preset's max_seq_len here; --context sets it)" if len(contexts) == 1 else
            "each preset's max_seq_len")
  lines += textwrap.wrap(f'(KV cache: {FLAGS.batch} x {tokens} tokens; {FIT_NOTE})', width=len(head))
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.batch < 1 or (FLAGS.context is not None and FLAGS.context < 1):
    raise ValueError(f'--batch and --context must be >= 1, got {FLAGS.batch} and {FLAGS.context}')
  if FLAGS.preset == 'all':
    cli.reject_arch_flags('all')
    names = presets.names()
    cfgs = [presets.get(name) for name in names]
    if FLAGS.scale_down:
      cfgs = [presets.scale_down(cfg) for cfg in cfgs]
    rows = []
    for name, cfg in zip(names, cfgs):
      try:
        rows.append(counting.describe(cfg, FLAGS.seq_len if FLAGS['seq_len'].present else cfg.max_seq_len, name,
                                      mesh_sizes(), FLAGS.context, FLAGS.batch))
      except ValueError as e:
        raise ValueError(f'{name}: {e}') from None
    print(json.dumps(rows) if FLAGS.json else format_all(rows))
    return
  cfg = cli.model_config_from_flags()
  seq_len = FLAGS.seq_len if FLAGS['seq_len'].present or not FLAGS.preset else cfg.max_seq_len
  row = counting.describe(cfg, seq_len, FLAGS.preset, mesh_sizes(), FLAGS.context, FLAGS.batch)
  if FLAGS.json:
    print(json.dumps(row))
    return
  if FLAGS.preset:
    name = f'{FLAGS.preset}{" (scaled down)" if FLAGS.scale_down else ""}'
    total, active = presets.PUBLISHED[FLAGS.preset]
    if not FLAGS.scale_down:
      show = lambda n: n if isinstance(n, str) else human(n)  # noqa: E731
      name += f'   published: {show(total)} total' + (f', {show(active)} active' if cfg.is_moe else '')
  else:
    name = f'{FLAGS.arch} d_model={cfg.d_model} n_layers={cfg.n_layers}'
    if cfg.is_moe:
      name += f' experts={cfg.n_experts} top_k={cfg.top_k} d_expert={cfg.expert_size}'
  print(format_table(name, row))


if __name__ == '__main__':
  cli.run(main)
