"""Training throughput of slmjax's real train step on the PyTorch peer's models, side by side with the peer.

  python experiments/bench_train.py                       # llama, mixtral-512, mixtral-1024 (the peer's shapes)
  python experiments/bench_train.py --peer                # also run the PyTorch peer (peer_torch.py), print ratios
  python experiments/bench_train.py --peer --dtype=bfloat16   # bf16 compute, f32 weights; the peer under autocast
  python experiments/bench_train.py --models=flags --arch=moe --d_model=512 --n_layers=8   # any size, by flags
  python experiments/bench_train.py --dtype=bfloat16 --matmuls=xla,onednn --peer   # XLA's dot and oneDNN's, interleaved
  python experiments/bench_train.py --json

The step is `slmjax.steps.make_train_step` (forward, loss with the router's aux loss, backward, clipping, AdamW),
the one `slmjax.train.train` runs, timed after warm-up on a fixed batch; the median of `--steps` steps is kept.
The models' steps are timed interleaved (one step of each per round), so the MoE / dense ratio holds on a
shared machine whose speed drifts by 10-30% for minutes at a time; `--rounds=3` repeats slmjax and the peer
alternately and reports the median round with the median of the rounds' ratios, every round listed.
FLOPs per step follow the peer's convention, which is also slmjax's (`counting.train_flops_per_token`):
tokens * (6 * matmul parameters a token uses + 6 * layers * seq_len * d_model), the attention term causal.
MFU divides the achieved FLOP/s by this machine's measured float32 (or --dtype) matmul peak.

The peer is experiments/peer_torch.py (Hugging Face transformers, eager), one process per model in its own venv;
with --dtype=bfloat16 it runs under torch.autocast(bfloat16) (fp32 master weights, as slmjax's param_dtype).
The peer's Mixtral is dropless, and so are slmjax's MoE rows by default; `--capacity_factor=1.25` (say) times
the dropping configuration instead, and the table reports the fraction of token-expert assignments dropped.
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import json
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import numpy as np
from absl import flags

from slmjax import cli, cost, counting, dispatch, steps
from slmjax.config import MATMULS, ModelConfig, TrainConfig

PEER_COMMON = dict(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=512,
                   tie_embeddings=False, rope_theta=10_000.0, activation='swiglu', norm='rmsnorm', norm_eps=1e-6)
PEER_MOE = dict(n_experts=8, top_k=2, router='softmax_topk', router_renormalize=True, lb_loss_weight=0.01,
                z_loss_weight=0.0)
PEER_MODELS = {  # the models of peer_torch.py, with identical shapes
    'llama': dict(PEER_COMMON, d_ff=1024),
    'mixtral-512': dict(PEER_COMMON, d_expert=512, **PEER_MOE),
    'mixtral-1024': dict(PEER_COMMON, d_expert=1024, **PEER_MOE),
}
PEER_SCRIPT = pathlib.Path(__file__).resolve().parent / 'peer_torch.py'
PEER_AUTOCAST = {'float32': 'off', 'bfloat16': 'bfloat16'}  # --dtype -> the peer's --autocast

flags.DEFINE_list('models', list(PEER_MODELS), f'Models to time: {", ".join(PEER_MODELS)}, or "flags" for the '
                  'model the usual model flags (--arch, --d_model, --preset, ...) describe.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
flags.DEFINE_integer('steps', 10, 'Timed steps; the median is reported.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps first (the first compiles).')
flags.DEFINE_float('lr', 3e-4, 'Peak learning rate (the peer uses AdamW at 3e-4).')
flags.DEFINE_boolean('peer', False, 'Also run the PyTorch peer (eager; under autocast with --dtype=bfloat16) in '
                     'its own venv and print slmjax / peer.')
flags.DEFINE_string('peer_python', os.path.expanduser('~/.hfpeer/bin/python'),
                    "The peer venv's python (set-up: ../shared/tools/README.md).")
flags.DEFINE_integer('rounds', 1, 'Repeat the timing (and the peer, with --peer) this many times, alternating; '
                     'the round with the median step time is reported with the median ratio to the peer, '
                     'every round listed.')
flags.DEFINE_list('matmuls', [], 'Time every model with each of these ModelConfig.matmul values (xla, mkl, onednn), '
                  'interleaved; rows other than the first are named model/matmul. Default: --matmul alone.')
flags.DEFINE_boolean('json', False, 'Print one JSON list of rows instead of a table.')
cli.define_model_flags()
flags.FLAGS.set_default('seq_len', 256)
flags.FLAGS.set_default('capacity_factor', 0.0)  # dropless, as the peer's Mixtral
FLAGS = flags.FLAGS


def model_config(name: str) -> ModelConfig:
  """A peer model (with the runtime flags given: dtypes, dispatch, capacity factor, ...), or the flags' model."""
  if name == 'flags':
    return cli.model_config_from_flags()
  cfg = cli.apply_runtime_flags(ModelConfig(**PEER_MODELS[name]))
  return cfg.replace(capacity_factor=cli.flag_values(ModelConfig)['capacity_factor'])  # this script's default: 0


def build_run(cfg: ModelConfig) -> list:
  """[step, state, opt_state, batch] for cost.time_train_steps: the real train step on one fixed random batch."""
  train_cfg = TrainConfig(steps=1000, warmup=10, lr=FLAGS.lr, batch_size=FLAGS.batch_size,
                                seq_len=FLAGS.seq_len)
  graphdef, state, tx, opt_state = steps.init_state(cfg, train_cfg)
  batch_BT1 = np.random.default_rng(0).integers(0, cfg.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1),
                                                dtype=np.int32)
  return [steps.make_train_step(graphdef, tx), state, opt_state, batch_BT1]


def model_row(name: str, cfg: ModelConfig, run: list, stats: dict, peak_flops: float) -> dict:
  """What a median step time implies for one model, with the router's drops and loads from one more step."""
  step, state, opt_state, batch_BT1 = run
  run[1], run[2], metrics = step(state, opt_state, batch_BT1)
  counts = counting.analytic_counts(cfg)
  flops_per_token = counting.train_flops_per_token(cfg, FLAGS.seq_len, counts)
  step_s = stats['median_s']
  measured = cost.throughput(FLAGS.batch_size * FLAGS.seq_len, step_s, flops_per_token, peak_flops)
  return dict(model=name, dispatch=dispatch.resolve(cfg.dispatch, cfg.dropless) if cfg.is_moe else None,
              total_params=counts.total, active_params=counts.active, step_time_s=step_s,
              step_time_min_s=stats['min_s'], step_time_mean_s=stats['mean_s'], tokens_per_s=measured['tokens_per_s'],
              achieved_gflops=measured['achieved_flops_per_s'] / 1e9, mfu=measured['mfu'],
              peak_gflops=peak_flops / 1e9, flops_per_step=flops_per_token * FLAGS.batch_size * FLAGS.seq_len,
              drop_fraction=float(metrics['drop_fraction']) if 'drop_fraction' in metrics else None,
              max_expert_load=(float(metrics['expert_load_max_over_mean']) if cfg.is_moe else None),
              batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, dtype=cfg.dtype, matmul=cfg.matmul,
              loss=float(metrics['loss']),
              platform=jax.default_backend(), jax_version=jax.__version__)


def check_peer() -> None:
  """Fail before any timing when --peer cannot run."""
  if not pathlib.Path(FLAGS.peer_python).exists():
    raise ValueError(f'--peer: no peer python at {FLAGS.peer_python}; set it up as ../shared/tools/README.md says, '
                     'or give --peer_python')
  if FLAGS.dtype not in PEER_AUTOCAST:
    raise ValueError(f'--peer: no peer mode for --dtype={FLAGS.dtype}; use one of {", ".join(PEER_AUTOCAST)}')


def peer_rows(models: list[str]) -> dict[str, dict]:
  """The peer's rows by model name, each model in a fresh process of the peer's venv (no allocator or thread-pool
  state carries over between models)."""
  rows = {}
  for name in models:
    cmd = [FLAGS.peer_python, str(PEER_SCRIPT), f'--models={name}', f'--batch={FLAGS.batch_size}',
           f'--seq={FLAGS.seq_len}', f'--steps={FLAGS.steps}', f'--warmup={FLAGS.warmup}',
           f'--autocast={PEER_AUTOCAST[FLAGS.dtype]}']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.update({row['model']: row for row in json.loads(out.strip().splitlines()[-1])})
  return rows


def _ratios(values: list[float]) -> str:
  return ', '.join(f'{v:.2f}' for v in values)


def format_table(rows: list[dict], rounds: list[list[dict]]) -> str:
  peak = rows[0]['peak_gflops']
  lines = [f'{rows[0]["platform"]}, jax {rows[0]["jax_version"]}, {rows[0]["dtype"]}, batch {rows[0]["batch_size"]} '
           f'x seq {rows[0]["seq_len"]}, median of {FLAGS.steps} steps (interleaved across models), '
           f'{len(rounds)} round(s); matmul peak {peak:.1f} GFLOP/s'
           + ('' if 'peer_autocast' not in rows[0] else
              f'; peer: eager, autocast {rows[0]["peer_autocast"]}'),
           f'{"model":<18}{"dispatch":>9}{"total":>12}{"active":>12}{"step ms":>9}{"tok/s":>8}{"GFLOP/s":>9}'
           f'{"MFU":>7}{"drop %":>8}{"max load":>9}{"peer tok/s":>12}{"ratio":>7}']
  for r in rows:
    drop = '-' if r['drop_fraction'] is None else f'{100 * r["drop_fraction"]:.2f}'
    load = '-' if r['max_expert_load'] is None else f'{r["max_expert_load"]:.2f}'
    peer = '-' if r.get('peer_tokens_per_s') is None else f'{r["peer_tokens_per_s"]:,.0f}'
    ratio = '-' if r.get('ratio_to_peer') is None else f'{r["ratio_to_peer"]:.2f}'
    lines.append(f'{r["model"]:<18}{r["dispatch"] or "-":>9}{r["total_params"]:>12,}{r["active_params"]:>12,}'
                 f'{r["step_time_s"] * 1e3:>9.1f}{r["tokens_per_s"]:>8,.0f}{r["achieved_gflops"]:>9.1f}'
                 f'{r["mfu"]:>7.1%}{drop:>8}{load:>9}{peer:>12}{ratio:>7}')
  times = [{r['model']: r['step_time_s'] for r in rows_i} for rows_i in rounds]
  moe_over_dense = [t['mixtral-512'] / t['llama'] for t in times if {'llama', 'mixtral-512'} <= set(t)]
  if moe_over_dense:
    lines.append(f'mixtral-512 / llama step time (same active parameters, timed interleaved): '
                 f'{statistics.median(moe_over_dense):.2f}'
                 + (f' (rounds: {_ratios(moe_over_dense)})' if len(moe_over_dense) > 1 else ''))
  by_round = [f'{r["model"]} {_ratios(r["ratio_to_peer_rounds"])}'
              for r in rows if len(r.get('ratio_to_peer_rounds', ())) > 1]
  if by_round:
    lines.append('slmjax / peer tokens/s, round by round: ' + '; '.join(by_round))
  return '\n'.join(lines)


def add_peer(rows: list[dict], peers: dict[str, dict]) -> None:
  for row in rows:
    peer = peers.get(row['model'].split('/')[0])
    if peer:
      row.update(peer_tokens_per_s=peer['tokens_per_s'], peer_step_time_s=peer['step_time_s'],
                 peer_achieved_gflops=peer['achieved_gflops'], ratio_to_peer=row['tokens_per_s'] /
                 peer['tokens_per_s'], peer_flops_per_step=peer['flops_per_step'], peer_autocast=peer['autocast'])


def median_rows(rounds: list[list[dict]]) -> list[dict]:
  """One row per model: the round whose step time is the median (odd rounds; the lower middle for even), with
  every round's step time and ratio to the peer listed, and the median of those ratios as the ratio (each
  round's peer ran minutes apart from its slmjax run, so a slow spell can land on either)."""
  rows = []
  for per_model in zip(*rounds):
    ordered = sorted(per_model, key=lambda r: r['step_time_s'])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row['step_time_s_rounds'] = [r['step_time_s'] for r in per_model]
    if 'ratio_to_peer' in row:
      row['ratio_to_peer_rounds'] = [r['ratio_to_peer'] for r in per_model]
      row['ratio_to_peer'] = statistics.median(row['ratio_to_peer_rounds'])
    rows.append(row)
  return rows


def main(argv):
  del argv
  for name in FLAGS.models:
    if name not in PEER_MODELS and name != 'flags':
      raise ValueError(f'--models: unknown model {name!r}; known: {", ".join(PEER_MODELS)}, flags')
  if not FLAGS.models:
    raise ValueError(f'--models is empty: name some of {", ".join(PEER_MODELS)}, flags')
  if FLAGS.rounds < 1 or FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise ValueError(f'--rounds={FLAGS.rounds} and --steps={FLAGS.steps} must be >= 1, --warmup={FLAGS.warmup} >= 0')
  fixed = cli.given_arch_flags()
  if fixed and 'flags' not in FLAGS.models:
    raise ValueError(f'--{fixed[0]} describes a model only with --models=flags; the peer models are fixed')
  if FLAGS.peer:
    check_peer()
  matmuls = FLAGS.matmuls or [FLAGS.matmul]
  for m in matmuls:
    if m not in MATMULS:
      raise ValueError(f'--matmuls: unknown matmul {m!r}; known: {", ".join(MATMULS)}')
  configs = {name if i == 0 else f'{name}/{m}': model_config(name).replace(matmul=m)
             for name in FLAGS.models for i, m in enumerate(matmuls)}
  peak = cost.matmul_peak_flops(dtype=FLAGS.dtype)
  runs = {name: build_run(cfg) for name, cfg in configs.items()}
  peer_models = [name for name in FLAGS.models if name in PEER_MODELS]
  rounds = []
  for i in range(FLAGS.rounds):
    stats = cost.time_train_steps(runs, FLAGS.warmup, FLAGS.steps)  # interleaved: ratios survive slow spells
    rows = [model_row(name, configs[name], runs[name], stats[name], peak) for name in configs]
    if not FLAGS.json:
      print(f'# round {i + 1}/{FLAGS.rounds}: ' + ', '.join(f'{r["model"]} {r["step_time_s"]:.3f} s/step'
                                                             for r in rows), file=sys.stderr)
    if FLAGS.peer and peer_models:
      add_peer(rows, peer_rows(peer_models))
      if not FLAGS.json:
        print(f'# round {i + 1}/{FLAGS.rounds}: slmjax / peer ' + ', '.join(
            f'{r["model"]} {r["ratio_to_peer"]:.2f}' for r in rows if 'ratio_to_peer' in r), file=sys.stderr)
    rounds.append(rows)
  rows = median_rows(rounds)
  if FLAGS.json:
    print(json.dumps(rows))
  else:
    print(format_table(rows, rounds))


if __name__ == '__main__':
  cli.run(main)
