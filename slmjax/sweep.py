"""Scaling sweeps: a ladder of model sizes, each trained through `slmjax.train`, one results row per run.

A sweep point is one (architecture, size, seed). Its run lives in `<out>/<run_id>/` (checkpoints, metrics) and,
once finished, its row is appended to `<out>/results.jsonl`. Rerunning the same sweep skips points that have a
row and resumes an unfinished point from its last checkpoint, so a kill loses at most the progress since then.

Matching MoE to dense (`match`): every MoE rung keeps the dense rung's d_model, layers and heads, and
- 'active' (default): d_expert = d_ff / top_k, so a token touches as many FFN parameters (and FLOPs) as in the
  dense model; total parameters grow about n_experts / top_k times in the FFNs;
- 'total': d_expert = d_ff / n_experts, so the MoE holds as many FFN parameters as the dense model and a token
  uses top_k / n_experts of them.
Matched FLOPs per token is 'active' up to the router (D x E per layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import platform
import time
from typing import Callable

import jax
import numpy as np

from slmjax import cost, counting, decode_cost, dispatch, report, results, sharding, wsd
from slmjax.config import ModelConfig, TrainConfig, branch_steps
from slmjax.train import format_duration, train

# Named ladders of dense sizes (d_model, n_layers); heads of width 32, d_ff = 4 d_model. 'cpu' spans 26x in
# parameters (41K to 1.1M with the byte vocabulary) and trains in about 11 (dense) and 16 (MoE) minutes on a
# 2-core laptop at experiments/sweep.py's default budget (1M tokens, 4 seeds); 'gpu' is for an accelerator.
LADDERS: dict[str, tuple[tuple[int, int], ...]] = {
    'cpu': ((32, 2), (64, 2), (96, 3), (128, 4)),
    'cpu-small': ((16, 1), (32, 1), (48, 2)),
    'gpu': ((256, 4), (384, 6), (512, 8), (768, 12), (1024, 16)),
}
MATCHES = ('active', 'total')
HEAD_DIM = 32


@dataclasses.dataclass(frozen=True)
class Budget:
  """Training tokens per model: a fixed count, or tokens_per_param x (non-embedding active) parameters."""
  tokens: int | None = None
  tokens_per_param: float | None = None

  def __post_init__(self):
    if (self.tokens is None) == (self.tokens_per_param is None):
      raise ValueError('give a token budget as --tokens or as --tokens_per_param, not both and not neither')
    if (self.tokens is not None and self.tokens <= 0) or (self.tokens_per_param is not None and
                                                          self.tokens_per_param <= 0):
      raise ValueError('the token budget must be positive')

  def tokens_for(self, counts: counting.ParamCounts) -> int:
    if self.tokens is not None:
      return self.tokens
    return int(self.tokens_per_param * counts.active_non_embedding)


def parse_sizes(spec: str) -> tuple[tuple[int, int], ...]:
  """A ladder name from LADDERS, or an explicit list 'D x L,...' such as '32x2,64x2,128x4'."""
  if spec in LADDERS:
    return LADDERS[spec]
  if not spec.strip():
    raise ValueError(f'--ladder is empty: name a ladder ({", ".join(LADDERS)}) or list sizes like 32x2,64x2')
  sizes = []
  for item in spec.split(','):
    parts = item.strip().lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f'--ladder={spec!r}: {item!r} is not D x L (e.g. 64x2); named ladders: {", ".join(LADDERS)}')
    sizes.append((int(parts[0]), int(parts[1])))
  return tuple(sizes)


def dense_rung(template: ModelConfig, d_model: int, n_layers: int) -> ModelConfig:
  """The dense model of one ladder size: heads of width 32 (at least one), d_ff = 4 d_model."""
  n_heads = max(1, d_model // HEAD_DIM)
  if d_model % n_heads:
    raise ValueError(f'ladder size {d_model}x{n_layers}: d_model must be a multiple of {HEAD_DIM} (or below it)')
  return template.replace(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=None, head_dim=None,
                          d_ff=4 * d_model, n_experts=0, d_expert=None)


def moe_rung(dense: ModelConfig, n_experts: int, top_k: int, match: str) -> ModelConfig:
  """The MoE counterpart of a dense rung (see the module docstring for `match`)."""
  if match not in MATCHES:
    raise ValueError(f'--match={match!r} is not one of {", ".join(MATCHES)}')
  divisor = top_k if match == 'active' else n_experts
  return dense.replace(n_experts=n_experts, top_k=top_k, d_expert=max(1, dense.ffn_size // divisor))


def ladder(template: ModelConfig, sizes, n_experts: int = 0, top_k: int = 2, match: str = 'active'
           ) -> list[ModelConfig]:
  """ModelConfigs of a whole ladder: dense when n_experts == 0, else the matched MoE models."""
  dense = [dense_rung(template, d, layers) for d, layers in sizes]
  return dense if n_experts == 0 else [moe_rung(cfg, n_experts, top_k, match) for cfg in dense]


# The fields the configs had when run ids were first written (slmjax 0.1). A field added since enters the hash
# only when it differs from its default, so adding a field never renames the runs of existing sweeps.
FIRST_FIELDS = {
    ModelConfig: frozenset((
        'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'activation', 'norm',
        'norm_eps', 'rope_theta', 'tie_embeddings', 'lm_head_bias', 'embed_scale', 'logit_softcap', 'post_norms',
        'max_seq_len', 'dtype', 'param_dtype', 'attention', 'qkv_bias', 'o_bias', 'qk_norm', 'attn_softcap',
        'q_lora_rank', 'kv_lora_rank', 'qk_rope_dim', 'v_head_dim', 'n_experts', 'top_k', 'd_expert',
        'n_shared_experts', 'd_shared', 'moe_every', 'first_dense', 'capacity_factor', 'group_size', 'dispatch',
        'router', 'router_renormalize', 'router_bias', 'routed_scale', 'shared_gate', 'lb_loss_weight',
        'z_loss_weight')),
    TrainConfig: frozenset((
        'steps', 'batch_size', 'seq_len', 'lr', 'warmup', 'min_lr_ratio', 'weight_decay', 'b1', 'b2', 'grad_clip',
        'data', 'eval_fraction', 'seed', 'eval_every', 'eval_batches', 'checkpoint_every', 'keep_checkpoints',
        'log_every')),
}


def identity(cfg: ModelConfig | TrainConfig) -> str:
  """The JSON a run id hashes: every first field, and any later field that is not at its default."""
  defaults = type(cfg)().to_dict()
  fields = {k: v for k, v in cfg.to_dict().items() if k in FIRST_FIELDS[type(cfg)] or v != defaults[k]}
  return json.dumps(fields, sort_keys=True)


def run_id(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
  """Readable and unique: arch, size, seed, and a hash of both configs (other settings never collide)."""
  arch = f'moe{model_cfg.n_experts}k{model_cfg.top_k}' if model_cfg.is_moe else 'dense'
  digest = hashlib.sha256((identity(model_cfg) + identity(train_cfg)).encode())
  return f'{arch}-d{model_cfg.d_model}-l{model_cfg.n_layers}-s{train_cfg.seed}-{digest.hexdigest()[:8]}'


def check_budget(rows: list[dict], budget: Budget, out_dir: str) -> None:
  """Refuse to mix token budgets in one results file (their curves would not be comparable)."""
  mine = dataclasses.asdict(budget)
  for row in rows:
    if row.get('budget') != mine:
      raise ValueError(f'--out={out_dir} holds results made with token budget {row.get("budget")}, not {mine}; '
                       f'use the same budget flags or another --out')


def result_row(model_cfg: ModelConfig, train_cfg: TrainConfig, budget: Budget, summary: dict,
               counts: counting.ParamCounts, rid: str, mesh=None, branch: dict | None = None,
               inference: dict | None = None) -> dict:
  """Everything needed to redraw every plot without rerunning (see README 'Results'): the point's counts, its
  summary from `train` and the cost measured there. `branch`: a WSD cooldown branch's marks (`branch_marks`);
  `inference`: the rung's decode cost (`decode_cost.rung_cost`)."""
  flops_per_token = summary['train_flops_per_token']
  tokens = train_cfg.steps * train_cfg.tokens_per_step
  param_bytes = counting.BYTES_PER_PARAM.get(model_cfg.param_dtype, 2.0)
  measured = summary['cost']
  return {
      'run_id': rid, 'arch': 'moe' if model_cfg.is_moe else 'dense', 'n_experts': model_cfg.n_experts,
      'top_k': model_cfg.top_k if model_cfg.is_moe else 0, 'd_model': model_cfg.d_model,
      'n_layers': model_cfg.n_layers, 'total_params': counts.total, 'active_params': counts.active,
      'total_non_embedding_params': counts.non_embedding,
      'active_non_embedding_params': counts.active_non_embedding, 'tokens': tokens,
      'train_flops_per_token': flops_per_token, 'train_flops': flops_per_token * tokens,
      'train_loss': summary['train_loss'], 'eval_loss': summary['eval_loss'], 'eval_bpb': summary.get('eval_bpb'),
      **router_health(summary),
      'unigram_eval_loss': summary.get('unigram_eval_loss'), **measured,
      'weight_bytes': int(counts.total * param_bytes), 'optimizer_state_bytes': summary['optimizer_state_bytes'],
      'mesh': dict(mesh.shape) if mesh is not None else None,
      'weight_bytes_per_device': int(sharding.bytes_per_device(model_cfg, dict(mesh.shape), param_bytes)
                                     if mesh is not None else counts.total * param_bytes),
      'seed': train_cfg.seed, 'budget': dataclasses.asdict(budget), 'device': jax.devices()[0].device_kind,
      'platform': jax.default_backend(), 'device_count': jax.device_count(), 'host': platform.node(),
      'jax_version': jax.__version__, 'model_config': model_cfg.to_dict(), 'train_config': train_cfg.to_dict(),
      'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S'), 'schedule': train_cfg.schedule, **(branch or {}),
      **(inference or {}),
  }


def branch_marks(point_cfg: TrainConfig, steps: int, point_id: str) -> dict:
  """What a WSD branch's row carries besides an ordinary row: the run it branched from, its length and its
  share of the point's full budget (1.0 for the full --steps; reports fit L(N) on those only)."""
  return {'wsd_run': point_id, 'branch_steps': steps, 'budget_fraction': steps / point_cfg.steps}


def point_dir(out: pathlib.Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> pathlib.Path:
  """Where a point trains: `<out>/<run id>/`. With schedule=wsd the id is that of the point without its
  `branches` (one directory per stable trunk), so a rerun with more --branches forks the new cooldowns from the
  trunk already trained; a directory of the older naming (branches in the id) is used when it is there."""
  if train_cfg.schedule != 'wsd':
    return out / run_id(model_cfg, train_cfg)
  older = out / run_id(model_cfg, train_cfg)
  return older if older.exists() else out / run_id(model_cfg, train_cfg.replace(branches=''))


def row_ids(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[int, str]:
  """{steps: run id} of the rows a sweep point yields: one, or with schedule=wsd one per cooldown branch (each
  named like the plain WSD run of its length)."""
  if train_cfg.schedule != 'wsd':
    return {train_cfg.steps: run_id(model_cfg, train_cfg)}
  return {steps: run_id(model_cfg, wsd.branch_config(train_cfg, steps)) for steps in train_cfg.branch_steps}


class SweepEta:
  """Time left in a sweep, from the points measured so far: the step time follows the FLOPs per step as a
  power law (a straight line in log-log through the finished points, proportional with only one of them),
  times each remaining point's steps, plus the mean time a point spends outside its timed steps (compiling,
  evaluating, measuring its cost). A small first rung does not make a large last rung look cheap or dear."""

  def __init__(self):
    self.flops_per_step, self.step_s, self.overhead_s = [], [], []

  def add(self, flops_per_step: float, steps: int, step_time_s: float | None, wall_s: float) -> None:
    if step_time_s:  # a point resumed after its last step has no timed steps
      self.flops_per_step.append(flops_per_step)
      self.step_s.append(step_time_s)
      self.overhead_s.append(max(0.0, wall_s - steps * step_time_s))

  def step_time(self, flops_per_step: float) -> float | None:
    if not self.step_s:
      return None
    x, y = np.log(self.flops_per_step), np.log(self.step_s)
    slope = np.polyfit(x, y, 1)[0] if len(set(self.flops_per_step)) > 1 else 1.0
    slope = min(max(slope, 0.0), 1.5)  # a noisy pair of points must not predict shrinking or exploding steps
    return float(np.exp(y[-1] + slope * (np.log(flops_per_step) - x[-1])))

  def remaining_s(self, points: list[tuple[float, int]]) -> float | None:
    """Seconds for the (flops per step, steps) points still to run; None before anything is measured."""
    if not self.step_s:
      return None
    return sum(self.step_time(f) * steps + float(np.mean(self.overhead_s)) for f, steps in points)


def router_health(summary: dict) -> dict:
  """An MoE point's router at the end of training: drops (train, and held-out at the eval capacity), the
  busiest expert's load over the uniform share, LB and z losses, entropy (nats); {} for dense."""
  if 'final_drop_fraction' not in summary:
    return {}
  return {'train_drop_fraction': summary['final_drop_fraction'],
          'eval_drop_fraction': summary.get('eval_drop_fraction'),
          'expert_load_max_over_mean': summary['final_expert_load_max_over_mean'],
          'lb_loss': summary['final_lb_loss'], 'z_loss': summary['final_z_loss'],
          'router_entropy': summary['final_router_entropy']}


def ragged_on_gpu_notice(configs: list[ModelConfig], backend: str) -> str | None:
  """A line for a GPU sweep whose MoE points train with the `ragged` dispatch (dropless, the sweep's default):
  XLA:GPU runs `ragged_dot` as a product over every expert (README, Speed, On a GPU)."""
  ragged = [cfg for cfg in configs if cfg.is_moe and dispatch.resolve(cfg.dispatch, cfg.dropless) == 'ragged']
  if backend not in ('gpu', 'cuda', 'rocm') or not ragged:
    return None
  return (f'note: {len(ragged)} MoE point(s) train dropless with ragged_dot, which XLA:GPU runs as a product over '
          f'every expert (E times the FLOPs; 7.9x the dense FFN at E=8 on an H200); --capacity_factor=1.25 '
          f'trains them with gather (1.7x)')


def run_sweep(points: list[tuple[ModelConfig, TrainConfig]], budget: Budget, out_dir: str,
              log: Callable[[str], None] = print, mesh=None, tensorboard: bool = False,
              measure_inference: bool = True, measure_mfu: bool = True) -> list[dict]:
  """Train every point not yet in `<out_dir>/results.jsonl`; returns this sweep's rows (old and new).

  A point with schedule=wsd trains its stable trunk and cooldown branches (slmjax/wsd.py) in `point_dir`
  and appends one row per branch as the branch finishes; rerun (also with more --branches), it trains only the
  branches without a row, from the same trunk.
  With a `mesh` every point trains sharded on it; with several processes only process 0 writes rows.
  `tensorboard`: event files per point in `<out_dir>/<run_id>/tensorboard/`. `measure_inference`: each row also
  carries the rung's decode cost (`decode_cost.rung_cost`: ms/token at batch 1 and 64, KV bytes per token, the
  decode's peak memory), measured once per point after it trains. `measure_mfu`: time this device's matmul peak
  once per compute dtype first (~7 s on a 2-core CPU) and give each row its MFU; without it rows have no MFU.
  """
  is_writer = jax.process_index() == 0
  out = pathlib.Path(out_dir)
  existing = results.read_rows(out)
  check_budget(existing, budget, out_dir)
  done = {row['run_id']: row for row in existing}
  dirs = [point_dir(out, m, t) for m, t in points]
  rows_of = [row_ids(m, t) for m, t in points]
  todo = [i for i, rids in enumerate(rows_of) if any(rid not in done for rid in rids.values())]
  partly = sum(0 < sum(rid in done for rid in rids.values()) < len(rids) for rids in rows_of)  # new branches
  log(f'sweep: {len(points)} points, {len(points) - len(todo)} already finished'
      + (f', {partly} with some of their cooldown branches done' if partly else '') + f' in {out}/results.jsonl')
  notice = ragged_on_gpu_notice([points[i][0] for i in todo], jax.default_backend())
  if notice:
    log(notice)
  peaks = {}  # compute dtype -> measured matmul FLOP/s, the MFU denominator of points in that dtype
  for dtype in dict.fromkeys(points[i][0].dtype for i in todo) if measure_mfu else ():
    peaks[dtype] = cost.matmul_peak_flops(dtype=dtype)
    log(f'measured {dtype} matmul peak of this {jax.default_backend()} device: {peaks[dtype] / 1e9:.1f} GFLOP/s')
  flops_per_step = [counting.train_flops_per_token(m, t.seq_len) * t.tokens_per_step for m, t in points]
  trained = [wsd.trained_steps(t) if t.schedule == 'wsd' else t.steps for _, t in points]
  eta = SweepEta()
  decode_costs: dict[str, dict] = {}
  for n, i in enumerate(todo):
    model_cfg, train_cfg = points[i]
    left = eta.remaining_s([(flops_per_step[j], trained[j]) for j in todo[n:]])
    counts = counting.analytic_counts(model_cfg)  # once per point, carried into train and the row
    branches = (f' (wsd: branches of {", ".join(map(str, rows_of[i]))} steps, {trained[i]} in all)'
                if train_cfg.schedule == 'wsd' else '')
    log(f'[point {n + 1}/{len(todo)}] {dirs[i].name}: {counts.total:,} params ({counts.active:,} active), '
        f'{train_cfg.steps} steps{branches}' + (f', sweep ETA {format_duration(left)}' if left is not None else ''))
    started = time.perf_counter()
    kwargs = dict(peak_flops=peaks.get(model_cfg.dtype), mesh=mesh, counts=counts, measure_cost=True,
                  tensorboard=tensorboard, log=(lambda line: log(f'  {line}')) if is_writer else None)

    inference = decode_costs.setdefault(identity(model_cfg), {})  # once per rung, not per seed or branch

    def add_row(cfg: TrainConfig, summary: dict, rid: str, branch: dict | None = None) -> None:
      if measure_inference and not inference:
        measuring = time.perf_counter()
        inference.update(decode_cost.rung_cost(model_cfg, min(train_cfg.seq_len, model_cfg.max_seq_len)))
        log(f'  decode cost measured in {time.perf_counter() - measuring:.1f} s')
      row = result_row(model_cfg, cfg, budget, summary, counts, rid, mesh, branch, inference)
      warning = report.router_warning(row)
      if warning:
        log(warning)
      if is_writer:
        results.append_row(out, row)
      done[rid] = row

    if train_cfg.schedule == 'wsd':
      summaries = wsd.train_wsd(
          model_cfg, train_cfg, dirs[i], skip=frozenset(s for s, rid in rows_of[i].items() if rid in done),
          on_branch=lambda steps, summary: add_row(wsd.branch_config(train_cfg, steps), summary,
                                                   rows_of[i][steps], branch_marks(train_cfg, steps, dirs[i].name)),
          **kwargs)
      step_times = [s['step_time_s'] for s in summaries.values() if s.get('step_time_s')]
      step_time = float(np.mean(step_times)) if step_times else None
    else:
      summary = train(model_cfg, train_cfg, dirs[i], **kwargs)
      add_row(train_cfg, summary, dirs[i].name)
      step_time = summary.get('step_time_s')
    wall_s = time.perf_counter() - started
    eta.add(flops_per_step[i], trained[i], step_time, wall_s)
    log(f'  point done in {format_duration(wall_s)}')
  return [done[rid] for rids in rows_of for rid in rids.values()]


def steps_for(budget: Budget, model_cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
  """Optimizer steps that spend the budget (rounded up to whole steps)."""
  tokens = budget.tokens_for(counting.analytic_counts(model_cfg))
  return max(1, math.ceil(tokens / (batch_size * seq_len)))


def sweep_points(configs: list[ModelConfig], budget: Budget, train_fields: dict, seeds: list[int]
                 ) -> list[tuple[ModelConfig, TrainConfig]]:
  """(model, training) pairs of a sweep: each config trained once per seed for the steps its budget buys, with
  the TrainConfig `train_fields` (e.g. `cli.train_fields_from_flags()`) whose warmup is capped at a tenth of the
  steps, of the shortest cooldown branch's with schedule=wsd (the smallest budget must not be spent warming up)."""
  points = []
  for model_cfg in configs:
    steps = steps_for(budget, model_cfg, train_fields['batch_size'], train_fields['seq_len'])
    shortest = branch_steps(train_fields.get('branches', ''), steps)[0]  # wsd: the first branch's warmup too
    for seed in seeds:
      points.append((model_cfg, TrainConfig(**{**train_fields, 'steps': steps, 'seed': seed,
                                               'warmup': min(train_fields['warmup'], shortest // 10)})))
  return points
