"""How fast is an MoE layer next to a dense FFN with the same active FLOPs, per dispatch implementation?

  python experiments/bench_moe.py                          # both layer settings + the whole-model check, tables
  python experiments/bench_moe.py --json                   # one JSON list of rows instead
  python experiments/bench_moe.py --settings=coarse --impls=gather,einsum --group_sizes=128,512 --nomodel

Layer rows: forward + backward (gradients for tokens, router and expert weights; the router's aux losses
included) of `slmjax.moe.MoEFFN` with each dispatch, against a dense FFN of width top_k * d_expert on the same
tokens (the FLOPs of the routed experts without capacity padding; the `DenseFFN` layer is timed too). The
`balanced` row is the floor every dispatch stands on: the experts' FFNs alone (`expert_ffn_rows`, the batched
products einsum and gather run), each on exactly tokens * top_k / n_experts rows, with no router, no dispatch and
no imbalance; an implementation's ratio above it is what routing and moving rows cost.
Settings: `coarse` = 8 experts, top-2, d_expert 512; `fine` = 64 experts, top-8, d_expert 64; both 4096 tokens,
d_model 256, capacity factor 1.25, float32 (flags change them). Expected on a 2-core CPU, coarse / fine:
balanced 1.06-1.15x / 1.45-1.75x, gather 1.05-1.1x / 2.0-2.8x, einsum at S=128 1.5-1.6x / 4.2-6x, ragged
1.05-1.15x / 2.0-2.3x; ratios move with machine load.
Model rows: one AdamW training step (`slmjax.steps.make_train_step`) of an MoE Transformer (8 experts, top-2,
d_expert = d_ff / 2) against the dense Transformer with the same d_model, layers and active parameters.

Timing: everything of one table is compiled and warmed up first, then timed round-robin (interleaved)
`--repeats` times, each sample the mean of `--inner` calls and taken right after a sample of the dense
baseline; times are medians of samples, ratios medians of the paired ratios. On a shared machine compare
ratios, and rerun. A candidate whose first timed call exceeds `--max_ratio` times the baseline is reported from
that one call (`repeats` 1).
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from slmjax import cli, cost, dispatch, steps, sweep
from slmjax.config import MATMULS, ModelConfig, TrainConfig
from slmjax.dispatch.experts import expert_ffn_rows
from slmjax.layers import DenseFFN, activate, linear
from slmjax.moe import MoEFFN

SETTINGS = {'coarse': dict(n_experts=8, top_k=2, d_expert=512), 'fine': dict(n_experts=64, top_k=8, d_expert=64)}
IMPLS = ('einsum', 'gather', 'ragged', 'dense')

flags.DEFINE_list('settings', list(SETTINGS), f'Layer settings to run: {", ".join(SETTINGS)}.')
flags.DEFINE_list('impls', list(IMPLS), 'Dispatch implementations to time.')
flags.DEFINE_list('group_sizes', ['128', '512'], 'Group sizes S for the dropping implementations (einsum, gather).')
flags.DEFINE_integer('tokens', 4096, 'Tokens per layer call.')
flags.DEFINE_integer('d_model', 256, 'Model width.')
flags.DEFINE_float('capacity_factor', 1.25, 'Expert capacity factor.')
flags.DEFINE_enum('activation', 'swiglu', ['swiglu', 'geglu', 'gelu'], 'FFN activation.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute and parameter dtype.')
flags.DEFINE_enum('matmul', 'auto', list(MATMULS), 'ModelConfig.matmul of every model and layer, the dense '
                  'baselines included (mkl / onednn: vendor GEMMs, slmjax/kernels/gemm.py).')
flags.DEFINE_integer('repeats', 7, 'Timed rounds; the median is reported.')
flags.DEFINE_integer('inner', 2, 'Calls per timed sample.')
flags.DEFINE_float('max_ratio', 10.0, 'Time a candidate slower than this many baselines once only.')
flags.DEFINE_boolean('model', True, 'Also time whole-model training steps, MoE vs dense.')
flags.DEFINE_list('model_impls', ['auto', 'einsum'], 'Dispatch implementations for the whole-model check.')
flags.DEFINE_integer('model_batch', 16, 'Sequences per training step in the whole-model check.')
flags.DEFINE_integer('model_seq_len', 256, 'Sequence length in the whole-model check.')
flags.DEFINE_integer('model_layers', 4, 'Transformer blocks in the whole-model check.')
flags.DEFINE_integer('model_d_ff', 1024, 'Dense FFN width of the whole-model check (MoE: 8 experts of d_ff / 2).')
flags.DEFINE_string('model_ladder', None, 'Instead of that one model: every rung of a sweep ladder (cpu, or '
                    '32x2,64x2,...) against its matched MoE (8 experts, top-2, as the sweep builds it), dropless '
                    'and at --capacity_factor; use --model_seq_len=128 for the sweep\'s batches.')
flags.DEFINE_boolean('json', False, 'Print one JSON list of rows instead of tables.')
FLAGS = flags.FLAGS


def layer_grad_fn(module: nnx.Module, moe: bool, weights: tuple[float, float]) -> Callable:
  """Jitted (x_BTD, dy_BTD) -> ((loss, drop fraction), gradients for params and x) of one FFN layer. The loss
  is <y, dy> and is returned, so the forward output is computed as in training (with grad alone, XLA drops the
  dense FFN's last forward matmul, which a linear loss's gradient does not need)."""
  graphdef, params = nnx.split(module)

  def loss(params, x_BTD, dy_BTD):
    out = nnx.merge(graphdef, params)(x_BTD)
    if not moe:
      return jnp.vdot(out, dy_BTD).astype(jnp.float32), jnp.zeros(())
    y_BTD, extras = out
    aux = weights[0] * extras['lb_loss'] + weights[1] * extras['z_loss']
    return jnp.vdot(y_BTD, dy_BTD).astype(jnp.float32) + aux, extras['drop_fraction']

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))  # value: the forward runs in full
  return lambda x_BTD, dy_BTD: grad(params, x_BTD, dy_BTD)


def flat_dense_grad_fn(layer: DenseFFN, activation: str, matmul: str = 'xla') -> Callable:
  """The baseline: `layer`'s FFN on the [tokens, D] matrix, each product a `linear` (so in bf16 XLA's dot
  accumulates in f32, as the model's do; a vendor GEMM with that ModelConfig.matmul)."""
  w = tuple(None if p is None else p[...] for p in (getattr(layer, 'w_gate_DF', None), layer.w_up_DF,
                                                    layer.w_down_FD))
  mm = functools.partial(linear, matmul=matmul)

  def loss(w, x_BTD, dy_BTD):
    x_XD, dy_XD = x_BTD.reshape(-1, x_BTD.shape[-1]), dy_BTD.reshape(-1, x_BTD.shape[-1])
    gate_XF = None if w[0] is None else mm(x_XD, w[0])
    y_XD = mm(activate(gate_XF, mm(x_XD, w[1]), activation), w[2])
    return jnp.vdot(y_XD, dy_XD).astype(jnp.float32), jnp.zeros(())

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return lambda x_BTD, dy_BTD: grad(w, x_BTD, dy_BTD)


def balanced_grad_fn(module: MoEFFN, x_BTD: jax.Array, dy_BTD: jax.Array) -> Callable:
  """The `balanced` floor: `module`'s expert FFNs, forward + backward, each on an equal share of the tokens'
  top_k copies ([E, X * k / E, D] rows made once, outside the timed function)."""
  cfg = module.cfg
  E, D = cfg.n_experts, cfg.d_model
  M = x_BTD.size // D * cfg.top_k // E  # check_flags: the rows divide evenly
  w = dispatch.ExpertWeights(*(None if a is None else a[...] for a in (getattr(module, 'w_gate_EDF', None),
                                                                      module.w_up_EDF, module.w_down_EFD)))
  share = lambda a_BTD: jnp.tile(a_BTD.reshape(-1, D), (cfg.top_k, 1)).reshape(E, M, D)
  x_EMD, dy_EMD = share(x_BTD), share(dy_BTD)

  def loss(w, x_EMD):
    y_EMD = expert_ffn_rows(x_EMD, w, jnp.int32(M), cfg.activation, (M,))
    return jnp.vdot(y_EMD, dy_EMD).astype(jnp.float32), jnp.zeros(())

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return lambda x_BTD, dy_BTD: grad(w, x_EMD)


def layer_rows(setting: str) -> list[dict]:
  """Time every implementation (and group size) of one setting against the matched dense FFN."""
  f = FLAGS
  shape = SETTINGS[setting]
  cfg = ModelConfig(d_model=f.d_model, n_heads=1, activation=f.activation, dtype=f.dtype, param_dtype=f.dtype,
                    matmul=f.matmul, capacity_factor=f.capacity_factor, d_ff=shape['top_k'] * shape['d_expert'],
                    **shape)
  rng = np.random.default_rng(0)
  x_BTD = jnp.asarray(rng.normal(size=(1, f.tokens, f.d_model)), cfg.dtype)
  dy_BTD = jnp.asarray(rng.normal(size=(1, f.tokens, f.d_model)), cfg.dtype)
  dense = DenseFFN(cfg, cfg.ffn_size, nnx.Rngs(params=0))
  candidates = {'dense_ffn': (flat_dense_grad_fn(dense, cfg.activation, cfg.matmul), None),
                'DenseFFN': (layer_grad_fn(dense, False, (0, 0)), None),
                'balanced': (balanced_grad_fn(MoEFFN(cfg, nnx.Rngs(params=0)), x_BTD, dy_BTD), None)}
  for impl in f.impls:
    dropless = impl in ('ragged', 'dense')
    for group_size in ([cfg.group_size] if dropless else [int(s) for s in f.group_sizes]):
      layer_cfg = cfg.replace(dispatch=impl, group_size=group_size)
      grad = layer_grad_fn(MoEFFN(layer_cfg, nnx.Rngs(params=0)), True, (cfg.lb_loss_weight, cfg.z_loss_weight))
      candidates[impl if dropless else f'{impl}@{group_size}'] = (grad, None if dropless else group_size)
  fns = {name: (lambda grad=grad: grad(x_BTD, dy_BTD)) for name, (grad, _) in candidates.items()}
  too_big = [name for name, fn in fns.items() if not cost.runs_in_memory(fn)]  # also the warm-up call
  if 'dense_ffn' in too_big:
    raise ValueError(f'--tokens={f.tokens} --d_model={f.d_model}: the dense baseline does not fit device memory')
  fns = {name: fn for name, fn in fns.items() if name not in too_big}
  times = cost.interleaved_times(fns, 0, f.repeats, f.inner, baseline='dense_ffn', max_ratio=f.max_ratio)
  dense_s = times['dense_ffn']['median_s']
  rows = []
  for name, (grad, group_size) in candidates.items():
    if name == 'dense_ffn':
      continue
    row = dict(kind='layer', setting=setting, impl=name.split('@')[0], group_size=group_size, tokens=f.tokens,
               d_model=f.d_model, d_expert=shape['d_expert'], n_experts=shape['n_experts'], top_k=shape['top_k'],
               capacity_factor=f.capacity_factor, activation=f.activation, dtype=f.dtype, matmul=f.matmul,
               dense_time_s=dense_s)
    if name in too_big:
      rows.append({**row, 'error': 'out of device memory'})
      continue
    rows.append({**row, 'time_s': times[name]['median_s'], 'ratio': times[name]['ratio'],
                 'repeats': times[name]['samples'], 'drop_fraction': float(grad(x_BTD, dy_BTD)[0][1])})
  return rows


def model_sets() -> list[tuple[ModelConfig, dict[str, ModelConfig]]]:
  """(dense config, {name: MoE config}) per table: the one model of the --model_* flags with each of
  --model_impls, or with --model_ladder every rung as the sweep builds it, dropless and at --capacity_factor
  (and dropless with each implementation of --model_impls, where that flag is given)."""
  f = FLAGS
  common = dict(vocab_size=256, max_seq_len=f.model_seq_len, activation=f.activation, dtype=f.dtype,
                param_dtype=f.dtype, matmul=f.matmul)
  if f.model_ladder:
    sets = []
    for dense in sweep.ladder(ModelConfig(**common), sweep.parse_sizes(f.model_ladder)):
      moe = sweep.moe_rung(dense, 8, 2, 'active')
      # With --model_impls given: each of them dropless (e.g. dense: every expert on every token) as well.
      extra = {f'{impl} dropless': moe.replace(capacity_factor=None, dispatch=impl)
               for impl in f.model_impls if impl != 'auto'} if f['model_impls'].present else {}
      sets.append((dense, {'dropless': moe.replace(capacity_factor=None),
                           f'cf {f.capacity_factor:g}': moe.replace(capacity_factor=f.capacity_factor), **extra}))
    return sets
  dense = ModelConfig(d_model=f.d_model, n_layers=f.model_layers, n_heads=4, d_ff=f.model_d_ff, **common)
  return [(dense, {impl: dense.replace(n_experts=8, top_k=2, d_expert=f.model_d_ff // 2,
                                       capacity_factor=f.capacity_factor, dispatch=impl)
                   for impl in f.model_impls})]


def model_rows(dense_cfg: ModelConfig, moes: dict[str, ModelConfig]) -> list[dict]:
  """Training step time of MoE Transformers against the dense one with the same active parameters."""
  f = FLAGS
  train_cfg = TrainConfig(steps=1000, warmup=10, batch_size=f.model_batch, seq_len=f.model_seq_len)
  batch_BT1 = np.random.default_rng(0).integers(0, 256, (f.model_batch, f.model_seq_len + 1), dtype=np.int32)
  runs = {}
  for name, cfg in {'dense': dense_cfg, **moes}.items():
    graphdef, state, tx, opt_state = steps.init_state(cfg, train_cfg)
    runs[name] = [steps.make_train_step(graphdef, tx), state, opt_state, batch_BT1]
  times = cost.time_train_steps(runs, warmup=1, repeats=f.repeats, baseline='dense')
  rows = []
  for name, cfg in moes.items():
    rows.append(dict(kind='model', setting='model', impl=dispatch.resolve(cfg.dispatch, cfg.dropless),
                     label=name, group_size=cfg.group_size, tokens=f.model_batch * f.model_seq_len,
                     d_model=cfg.d_model, d_expert=cfg.expert_size, n_experts=cfg.n_experts, top_k=cfg.top_k,
                     capacity_factor=cfg.capacity_factor, activation=cfg.activation, dtype=cfg.dtype,
                     matmul=cfg.matmul, n_layers=cfg.n_layers, dense_d_ff=dense_cfg.ffn_size,
                     time_s=times[name]['median_s'], dense_time_s=times['dense']['median_s'],
                     ratio=times[name]['ratio'], repeats=times[name]['samples']))
  return rows


def format_table(rows: list[dict]) -> str:
  r0 = rows[0]
  if r0['kind'] == 'layer':
    title = (f"MoE layer fwd+bwd: {r0['tokens']} tokens, d_model {r0['d_model']}, {r0['n_experts']} experts, "
             f"top-{r0['top_k']}, d_expert {r0['d_expert']}, capacity factor {r0['capacity_factor']}; "
             f"dense FFN d_ff {r0['top_k'] * r0['d_expert']}: {r0['dense_time_s'] * 1e3:.1f} ms; {r0['dtype']}, "
             f"matmul {r0['matmul']}")
  else:
    title = (f"Training step: {r0['n_layers']} layers, d_model {r0['d_model']}, {r0['tokens']} tokens; dense d_ff "
             f"{r0['dense_d_ff']} vs {r0['n_experts']} experts top-{r0['top_k']} d_expert {r0['d_expert']}: "
             f"dense {r0['dense_time_s'] * 1e3:.1f} ms; {r0['dtype']}, matmul {r0['matmul']}\n(the dense model runs "
             f"slmjax.layers.DenseFFN: see its row in the layer tables for its cost against the flat dense FFN)")
  lines = [title, f"  {'impl':<16} {'group':>6} {'time ms':>9} {'ratio':>7} {'drop %':>7} {'runs':>5}"]
  for r in rows:
    drop = f"{100 * r['drop_fraction']:.2f}" if 'drop_fraction' in r else '-'
    group = r['group_size'] if r['group_size'] and r['impl'] in ('einsum', 'gather') else '-'
    name = r['impl'] if r.get('label', r['impl']) == r['impl'] else f"{r['impl']} ({r['label']})"
    if 'error' in r:
      lines.append(f"  {name:<16} {group:>6}   {r['error']}")
      continue
    lines.append(f"  {name:<16} {group:>6} {r['time_s'] * 1e3:>9.1f} {r['ratio']:>7.2f} {drop:>7} "
                 f"{r['repeats']:>5}")
  return '\n'.join(lines)


def check_flags() -> None:
  """One-line errors for flag values the tables cannot be made from."""
  f = FLAGS
  for name in f.settings:
    if name not in SETTINGS:
      raise ValueError(f'--settings: unknown setting {name!r}; known: {", ".join(SETTINGS)}')
  for name in f.impls:
    if name not in IMPLS:
      raise ValueError(f'--impls: unknown implementation {name!r}; this benchmark times {", ".join(IMPLS)}')
  for name in f.model_impls:
    if name != 'auto' and name not in dispatch.DISPATCH:
      raise ValueError(f'--model_impls: unknown implementation {name!r}; known: auto, {", ".join(dispatch.DISPATCH)}')
  if not f.group_sizes or not all(s.isdigit() and int(s) > 0 for s in f.group_sizes):
    raise ValueError(f'--group_sizes={",".join(f.group_sizes)}: give positive integers, e.g. 128,512')
  for name in ('tokens', 'd_model', 'repeats', 'inner', 'model_batch', 'model_seq_len', 'model_layers',
               'model_d_ff'):
    if f[name].value < 1:
      raise ValueError(f'--{name}={f[name].value} must be positive')
  for name in f.settings:
    if f.tokens * SETTINGS[name]['top_k'] % SETTINGS[name]['n_experts']:
      raise ValueError(f'--tokens={f.tokens}: setting {name!r} needs tokens * top_k divisible by its '
                       f'{SETTINGS[name]["n_experts"]} experts (the balanced row gives each an equal share)')
  if f.model_ladder is not None:
    try:
      sweep.parse_sizes(f.model_ladder)
    except ValueError as e:
      raise ValueError(str(e).replace('--ladder', '--model_ladder')) from None
  if not (f.settings and f.impls) and not f.model:
    raise ValueError('nothing to time: give --settings and --impls, or --model')


def main(argv):
  del argv
  check_flags()
  platform = f'{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} cores)'
  tables = [layer_rows(name) for name in FLAGS.settings]
  if FLAGS.model:
    tables += [model_rows(dense, moes) for dense, moes in model_sets()]
  tables = [rows for rows in tables if rows]
  for rows in tables:
    for row in rows:
      row['platform'] = platform
  if FLAGS.json:
    print(json.dumps([row for rows in tables for row in rows]))
    return
  print(f'{platform}; default dispatch here: {dispatch.resolve("auto")}; {FLAGS.dtype}')
  for rows in tables:
    print()
    print(format_table(rows))


if __name__ == '__main__':
  cli.run(main)
