"""What expert parallelism moves: the all-to-all dispatch against XLA's partitioner, measured and projected.

  python experiments/bench_ep.py                       # E=8 and E=64 on EP 4 and 8 (8 simulated CPU devices)
  python experiments/bench_ep.py --experts=8 --ep=4 --steps=3 --dropless

Measured rows: one AdamW training step (`slmjax.steps.make_train_step`) of a small MoE Transformer on a mesh
data:8/EP,expert:EP, with dispatch=alltoall and with dispatch=gather (ragged with --dropless): today's
partitioner path, the expert sharding alone, XLA placing the collectives. From the compiled program: every
collective by kind, count and bytes (results on one device, `slmjax.collectives`); step time, median of --steps
timed steps taken in turns.
Check rows: the forward all-to-all bytes of the compiled program per token per MoE layer beside the closed form
(`slmjax.dispatch.alltoall.forward_exchange_bytes`). Projection: that formula for DeepSeek-V3 and Kimi K2 in
bfloat16 on EP 8-64: bytes per token per MoE layer, forward dispatch + combine (a training step moves twice).
Simulated devices share this machine's cores, so step times say little about a real interconnect: compare the
bytes, and read the times as a check that the exchange costs no extra compute. The default run took ~20 minutes
on a loaded 2-core machine (compiling the partitioner path at E=64 dominates); --experts=8 --ep=4 a few.
"""

from __future__ import annotations

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import time

import jax
import numpy as np
from absl import flags

from slmjax import cli, collectives, presets, sharding, steps
from slmjax.config import ModelConfig, TrainConfig
from slmjax.dispatch.alltoall import forward_exchange_bytes

flags.DEFINE_list('experts', ['8', '64'], 'Expert counts E to measure (top-2 for 8 or fewer, else top-8).')
flags.DEFINE_list('ep', ['4', '8'], 'Expert-parallel sizes (the mesh is data:8/EP,expert:EP).')
flags.DEFINE_list('projection_ep', ['8', '16', '32', '64'], 'EP sizes of the projection table.')
flags.DEFINE_float('capacity_factor', 1.25, 'Capacity factor of the measured models.')
flags.DEFINE_boolean('dropless', False, 'Measure dropless models instead.')
flags.DEFINE_integer('steps', 5, 'Timed steps per configuration.')
flags.DEFINE_integer('batch_size', 32, 'Sequences per step.')
flags.DEFINE_integer('seq_len', 64, 'Tokens per sequence.')
FLAGS = flags.FLAGS


def model_config(experts: int, dispatch: str) -> ModelConfig:
  return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=experts,
                     top_k=2 if experts <= 8 else 8, d_expert=32, group_size=128, max_seq_len=FLAGS.seq_len,
                     dispatch=dispatch,
                     capacity_factor=None if FLAGS.dropless else FLAGS.capacity_factor)


def compiled_step(cfg: ModelConfig, mesh):
  """The jitted train step on `mesh`, its placed arguments, and the collectives of its compiled program."""
  train_cfg = TrainConfig(batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, steps=100, warmup=1)
  graphdef, state, tx, opt_state = steps.init_state(cfg, train_cfg)
  batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1), np.int32)
  state, opt_state = sharding.place_state(state, opt_state, mesh=mesh, tx=tx)
  batch = sharding.batch_placer(mesh, FLAGS.batch_size)(batch, whole=True)
  step = steps.make_train_step(graphdef, tx)
  text = step.lower(state, opt_state, batch).compile().as_text()
  return step, [state, opt_state, batch], collectives.collectives(text, dict(mesh.shape))


def timed(runs: dict) -> dict[str, float]:
  """Median step seconds of each jitted step, the steps taken in turns (one of each, then again)."""
  times = {name: [] for name in runs}
  for _ in range(FLAGS.steps + 2):
    for name, (compiled, args) in runs.items():
      start = time.perf_counter()
      args[0], args[1], metrics = compiled(*args)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  # Warm-up: the first two calls (the second may compile again, for the layouts the first one returned).
  return {name: float(np.median(t[2:])) for name, t in times.items()}


def measure(experts: int, ep: int) -> None:
  base = 'ragged' if FLAGS.dropless else 'gather'  # the partitioner path: expert sharding alone
  with jax.set_mesh(mesh := sharding.make_mesh(f'data:{8 // ep},expert:{ep}')):
    built = {d: compiled_step(model_config(experts, d), mesh) for d in ('alltoall', base)}
    seconds = timed({d: (compiled, args) for d, (compiled, args, _) in built.items()})
  cfg = model_config(experts, 'alltoall')
  print(f'\nE={experts}, top-{cfg.top_k}, mesh {",".join(f"{k}:{v}" for k, v in mesh.shape.items() if v > 1)}, '
        f'{"dropless" if cfg.dropless else f"capacity factor {cfg.capacity_factor}"}, '
        f'{FLAGS.batch_size}x{FLAGS.seq_len} tokens, float32')
  print(f'  {"dispatch":10} {"collective":20} {"count":>6} {"bytes/device":>14}')
  total = {}
  for d, (_, _, found) in built.items():
    summary = collectives.summary(found)
    total[d] = sum(s['bytes'] for s in summary.values())
    for kind, s in summary.items():
      print(f'  {d:10} {kind:20} {s["count"]:6d} {s["bytes"]:14,d}')
    print(f'  {d:10} {"all, per step":20} {sum(s["count"] for s in summary.values()):6d} {total[d]:14,d}'
          f'   step {seconds[d] * 1e3:7.1f} ms')
  print(f'  alltoall / {base}: bytes {total["alltoall"] / total[base]:.2f}x, '
        f'step time {seconds["alltoall"] / seconds[base]:.2f}x')
  tokens, moe_layers = FLAGS.batch_size * FLAGS.seq_len // 8, cfg.n_layers - cfg.first_dense
  forward = [c for c in built['alltoall'][2] if c.kind == 'all-to-all' and 'transpose' not in c.op]
  compiled_bytes = sum(c.bytes for c in forward) / moe_layers / tokens
  formula = forward_exchange_bytes(tokens, cfg.d_model, experts, cfg.top_k, ep, 4, cfg.capacity(cfg.group_size),
                                   cfg.group_size) / tokens
  print(f'  check: forward all-to-all bytes per token per MoE layer, compiled {compiled_bytes:.1f}, '
        f'formula {formula:.1f}')


def projection() -> None:
  print('\nProjection: bytes per token per MoE layer, forward dispatch + combine, bfloat16 '
        '(x (EP-1)/EP leaves the device; a training step moves twice this)')
  print(f'  {"model":12} {"EP":>4} {"cf 1.25":>18} {"dropless ragged":>18} {"ragged, leaves":>18} '
        f'{"dropless padded":>18}')
  for name in ('deepseek-v3', 'kimi-k2'):
    cfg = presets.get(name).replace(capacity_factor=1.25)
    S, D, E, k = cfg.group_size, cfg.d_model, cfg.n_experts, cfg.top_k
    for ep in map(int, FLAGS.projection_ep):
      ragged = forward_exchange_bytes(S, D, E, k, ep, 2, S, S, ragged=True) / S
      row = [forward_exchange_bytes(S, D, E, k, ep, 2, cfg.capacity(S), S) / S, ragged, ragged * (ep - 1) / ep,
             forward_exchange_bytes(S, D, E, k, ep, 2, S, S) / S]
      print(f'  {name:12} {ep:4d} ' + ' '.join(f'{b / 1024:14,.1f} KiB' for b in row))


def main(argv):
  del argv
  if FLAGS.steps < 1 or FLAGS.batch_size < 1 or FLAGS.seq_len < 1:
    raise ValueError('--steps, --batch_size and --seq_len must be positive')
  experts, eps = cli.positive_ints('experts'), cli.positive_ints('ep')
  cli.positive_ints('projection_ep')
  if any(jax.device_count() % ep for ep in eps):
    raise ValueError(f'--ep={",".join(map(str, eps))}: each must divide the {jax.device_count()} devices')
  for e, ep in ((e, ep) for e in experts for ep in eps):
    if e % ep:
      raise ValueError(f'--experts={e} does not split over --ep={ep}: the expert count must be a multiple of EP')
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices')
  for e in experts:
    for ep in eps:
      measure(e, ep)
  projection()


if __name__ == '__main__':
  cli.run(main)
