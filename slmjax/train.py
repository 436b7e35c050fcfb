"""Training: AdamW with warmup + cosine decay, the loss, jitted train/eval steps and the resumable loop.

The train step is a pure function `(state, opt_state, batch_BT1) -> (state, opt_state, metrics)` over the
`nnx.split` model state (the graph definition is closed over), jitted with donated state buffers; it knows
nothing about where the model came from, so callers can add shardings (`make_train_step(..., in_shardings=...)`).
`train()` runs a whole experiment in an output directory and resumes from the latest checkpoint there.

Dimension letters: B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slmjax import cost
from slmjax.config import ConfigDict, ModelConfig
from slmjax.model import abstract_model, create_model

# TrainConfig fields that may differ when resuming a run (duration and bookkeeping, not the experiment).
RESUMABLE_FIELDS = ('steps', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'log_every')


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigDict):
  """One training run: optimisation, data, evaluation and checkpoint cadence. `batch_size` is global."""

  steps: int = 1000
  batch_size: int = 32
  seq_len: int = 256
  lr: float = 3e-3  # peak learning rate, reached after `warmup` steps, then cosine decay to lr * min_lr_ratio
  warmup: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1  # decoupled (AdamW); matrices only, never norm gains or biases
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0  # global-norm clipping; 0 disables it
  data: str = 'stdlib'  # see slmjax.data
  eval_fraction: float = 0.05  # fraction of documents held out
  seed: int = 0  # model initialisation and data order
  eval_every: int = 100  # 0 = only at the end
  eval_batches: int = 8
  checkpoint_every: int = 500  # 0 = only at the end
  keep_checkpoints: int = 2
  log_every: int = 10

  def __post_init__(self):
    for name in ('steps', 'batch_size', 'seq_len', 'eval_batches', 'log_every', 'keep_checkpoints'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    for name in ('warmup', 'eval_every', 'checkpoint_every', 'seed'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
    if self.warmup >= self.steps:
      raise ValueError(f'warmup={self.warmup} must be smaller than steps={self.steps}')
    if not self.lr > 0:
      raise ValueError(f'lr must be positive, got {self.lr}')
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f'min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}')
    if self.weight_decay < 0 or self.grad_clip < 0:
      raise ValueError('weight_decay and grad_clip must be >= 0')
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f'b1={self.b1} and b2={self.b2} must be in [0, 1)')
    if not 0 < self.eval_fraction < 1:
      raise ValueError(f'eval_fraction must be in (0, 1), got {self.eval_fraction}')
    if not self.data:
      raise ValueError('data must name a corpus, path or glob')

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len



class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss or gradient; the run stopped without saving."""


# Optimiser.
def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices and embeddings only: 1-D parameters are norm gains and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(clip, optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                       mask=decay_mask))


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """A fresh model split into `(graphdef, state)`, the optimizer, and its state over the nnx.Param part.

  `state` holds every model variable: parameters, and any non-parameter variables (e.g. statistics a layer
  updates in its forward pass), which the train step carries through without gradients.
  """
  graphdef, state = nnx.split(create_model(model_cfg, train_cfg.seed))
  tx = make_optimizer(train_cfg)
  params, _ = nnx.split_state(state, nnx.Param, ...)
  return graphdef, state, tx, tx.init(params)


# Loss and steps.
def loss_fn(model, batch_BT1: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy + the model's weighted aux loss (lb_loss_weight * lb + z_loss_weight * z)."""
  inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
  logits_BTV, extras = model(inputs_BT)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
  loss = ce + extras['aux_loss']
  metrics = {'loss': loss, 'ce': ce}
  if extras['moe_layers']:
    metrics.update({k: extras[k] for k in ('aux_loss', 'lb_loss', 'z_loss', 'drop_fraction', 'router_entropy')})
    # Balance: the busiest expert's share over the uniform share (1 = perfectly balanced), worst MoE layer.
    loads_LE = jnp.stack([layer['expert_load'] for layer in extras['moe_layers']])
    metrics['expert_load_max_over_mean'] = jnp.max(loads_LE) * loads_LE.shape[-1]
  return loss, metrics


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
  """The pure (unjitted) train step `(state, opt_state, batch_BT1) -> (state, opt_state, metrics)`."""
  def step(state, opt_state, batch_BT1):
    params, rest = nnx.split_state(state, nnx.Param, ...)

    def loss_of(p):
      model = nnx.merge(graphdef, p, rest)
      loss, metrics = loss_fn(model, batch_BT1)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (_, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return nnx.merge_state(optax.apply_updates(params, updates), rest), opt_state, metrics
  return step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, **jit_kwargs) -> Callable:
  """The jitted train step; state and opt_state buffers are donated (use the returned ones)."""
  return jax.jit(train_step_fn(graphdef, tx), donate_argnums=(0, 1), **jit_kwargs)


def make_eval_step(graphdef: nnx.GraphDef, **jit_kwargs) -> Callable:
  """Jitted `(state, batch_BT1) -> mean cross-entropy` (no aux loss: comparable across architectures)."""
  def step(state, batch_BT1):
    return loss_fn(nnx.merge(graphdef, state), batch_BT1)[1]['ce']
  return jax.jit(step, **jit_kwargs)


def cached_steps(graphdef: nnx.GraphDef, train_cfg: TrainConfig) -> tuple[Callable, Callable]:
  """(train step, eval step) for a model structure and optimizer, compiled once per process: repeated
  `train()` calls (resuming, a sweep revisiting a configuration, a benchmark) reuse them."""
  keep = ('steps', 'lr', 'warmup', 'min_lr_ratio', 'weight_decay', 'b1', 'b2', 'grad_clip')
  return _cached_steps(graphdef, TrainConfig().replace(**{k: getattr(train_cfg, k) for k in keep}))


@functools.lru_cache(maxsize=8)
def _cached_steps(graphdef: nnx.GraphDef, optimizer_cfg: TrainConfig) -> tuple[Callable, Callable]:
  return make_train_step(graphdef, make_optimizer(optimizer_cfg)), make_eval_step(graphdef)


def evaluate(eval_step: Callable, state, batches_NBT1: np.ndarray) -> float:
  """Mean held-out cross-entropy (nats/token) over the fixed eval batches."""
  return float(np.mean(jax.device_get([eval_step(state, b) for b in batches_NBT1])))


# The run directory: config.json, metrics.jsonl, summary.json and checkpoints/.
def check_out_dir(out_dir: pathlib.Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict | None:
  """config.json of the run already in `out_dir` (None if there is none); ValueError if it cannot be resumed."""
  if not out_dir.exists():
    return None
  if not out_dir.is_dir():
    raise ValueError(f'out dir {out_dir} exists and is not a directory')
  config_path = out_dir / 'config.json'
  if not config_path.exists():
    if any(out_dir.iterdir()):
      raise ValueError(f'out dir {out_dir} is not empty and holds no run (no config.json); choose another')
    return None
  previous = json.loads(config_path.read_text())
  # Through the dataclasses, so fields added to a config since the run started compare at their defaults.
  changed = _changes(ModelConfig.from_dict(previous['model']).to_dict(), model_cfg.to_dict())
  if changed:
    raise ValueError(f'out dir {out_dir} holds a run with a different architecture ({changed}); use another --out')
  changed = _changes(TrainConfig.from_dict(previous['train']).to_dict(), train_cfg.to_dict(), RESUMABLE_FIELDS)
  if changed:
    raise ValueError(f'out dir {out_dir} holds a run with other training settings ({changed}); '
                     f'only {", ".join(RESUMABLE_FIELDS)} may change when resuming')
  return previous


def _changes(old: dict, new: dict, allowed: tuple[str, ...] = ()) -> str:
  return ', '.join(f'{k} {old[k]!r} -> {v!r}' for k, v in new.items() if k not in allowed and old[k] != v)


def write_json(path: pathlib.Path, obj: Any, writer: bool = True) -> None:
  """Write JSON atomically (temporary file, then rename); a no-op on processes that are not the writer."""
  if not writer:
    return
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)


class MetricsLog:
  """metrics.jsonl, one JSON object per line; on (re)start, lines past the restored step are dropped."""

  def __init__(self, path: pathlib.Path, start_step: int, enabled: bool = True):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      keep = [line for line in path.read_text().splitlines()
              if line.strip() and start_step and json.loads(line).get('step', 0) <= start_step]
      tmp = path.with_name(f'.{path.name}.tmp')
      tmp.write_text(''.join(line + '\n' for line in keep))
      os.replace(tmp, path)

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')

  def last(self, key: str) -> dict:
    """The last row that has `key` ({} if none)."""
    rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
    return next((r for r in reversed(rows) if key in r), {})


def _format_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def progress_line(row: dict, steps: int, eta_s: float | None) -> str:
  parts = [f'step {row["step"]:>{len(str(steps))}}/{steps}']
  if 'train_loss' in row:
    parts.append(f'loss {row["train_loss"]:.4f}')
  if 'eval_loss' in row:
    parts.append(f'eval {row["eval_loss"]:.4f}' + (f' ({row["eval_bpb"]:.3f} bpb)' if 'eval_bpb' in row else ''))
  if 'tokens_per_s' in row:
    parts.append(f'{row["tokens_per_s"] / 1e3:.1f}k tok/s')
  if eta_s is not None:
    parts.append(f'ETA {_format_time(eta_s)}')
  return ' | '.join(parts)


# The loop.
def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | os.PathLike, *,
          stop_at_step: int | None = None, peak_flops: float | None = None,
          log: Callable[[str], None] | None = functools.partial(print, flush=True),
          place_state: Callable | None = None, place_batch: Callable | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Train one model in `out_dir`, resuming from its latest checkpoint; returns the final metrics.

  Every input is checked before anything is written. `stop_at_step` ends this call early (checkpointed) as
  if the job were interrupted; calling again continues. `peak_flops` (e.g. `cost.matmul_peak_flops()`) adds MFU.
  `place_state(state, opt_state) -> (state, opt_state)` puts the fresh state on devices (default: committed to
  the first local device; with a mesh, `jax.device_put` with NamedShardings); checkpoints restore into the same
  placement and the jitted step follows it. `place_batch` turns a process-local numpy batch into a (sharded)
  global array; it is needed with several processes. `mesh` (see `slmjax.sharding`) sets both from the
  parameters' logical axis names and runs the step under `jax.set_mesh(mesh)`; only process 0 writes files
  other than checkpoints (which every process writes its shards of).
  Raises NonFiniteLossError if a loss, gradient or parameter is not finite (the last good checkpoint is kept).
  """
  from slmjax import checkpoint, counting, data  # local: the step builders above need neither grain nor orbax
  out = pathlib.Path(out_dir)
  if train_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f'seq_len={train_cfg.seq_len} exceeds the model max_seq_len={model_cfg.max_seq_len}')
  if stop_at_step is not None and stop_at_step <= 0:
    raise ValueError(f'stop_at_step must be positive, got {stop_at_step}')
  if mesh is not None:
    from slmjax import sharding
    place_state = place_state or functools.partial(sharding.place_state, mesh=mesh,
                                                   tx=make_optimizer(train_cfg))
    place_batch = place_batch or sharding.batch_placer(mesh, train_cfg.batch_size)
    sharding.state_shardings(nnx.state(abstract_model(model_cfg)), mesh)  # a mesh that does not fit: fail now
  if jax.process_count() > 1 and place_batch is None:
    raise ValueError('training with several processes needs a mesh (global arrays from local batches)')
  previous = check_out_dir(out, model_cfg, train_cfg)
  corpus = data.load_corpus(train_cfg.data, train_cfg.eval_fraction)
  if corpus.max_token >= model_cfg.vocab_size:
    raise ValueError(f'data {train_cfg.data!r} has token id {corpus.max_token} >= vocab_size={model_cfg.vocab_size}')
  if previous and previous['data']['data_fingerprint'] != corpus.fingerprint:
    raise ValueError(f'data {train_cfg.data!r} changed since the run in {out} started (other content)')
  done = checkpoint.latest_step(out / 'checkpoints')
  if done is not None and done > train_cfg.steps:
    raise ValueError(f'the run in {out} is already at step {done}, past steps={train_cfg.steps}')
  B, T = train_cfg.batch_size, train_cfg.seq_len
  ds = data.train_dataset(corpus.train_N, T, B, train_cfg.seed, jax.process_index(), jax.process_count())
  eval_NBT1 = data.eval_batches(corpus.eval_N, T, B, train_cfg.eval_batches)

  if place_batch is not None:  # the same held-out windows on every process, as one global array each
    eval_NBT1 = [place_batch(b, whole=True) for b in eval_NBT1]
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return _train_loop(model_cfg, train_cfg, out, corpus, ds, eval_NBT1, stop_at_step, peak_flops, log,
                       place_state, place_batch)


def _train_loop(model_cfg, train_cfg, out, corpus, ds, eval_NBT1, stop_at_step, peak_flops, log,
                place_state, place_batch) -> dict[str, Any]:
  """The body of `train` once every input is checked (and the mesh, if any, is set)."""
  from slmjax import checkpoint, counting, data
  writer = jax.process_index() == 0  # only process 0 writes JSON files; every process writes checkpoint shards
  B, T = train_cfg.batch_size, train_cfg.seq_len
  # Every check passed: from here on the run directory is written.
  out.mkdir(parents=True, exist_ok=True)
  counts = counting.analytic_counts(model_cfg)
  flops_per_token = counting.train_flops_per_token(model_cfg, T, counts)
  unigram_loss = corpus.unigram_loss()
  write_json(out / 'config.json', writer=writer, obj={
      'model': model_cfg.to_dict(), 'train': train_cfg.to_dict(), 'data': corpus.summary(),
      'counts': counting.summary(model_cfg, T, counts), 'unigram_eval_loss': unigram_loss,
      'devices': [d.device_kind for d in jax.devices()], 'process_count': jax.process_count(),
      'versions': {m.__name__: m.__version__ for m in (jax, optax, flax)}})
  graphdef, state, _, opt_state = init_state(model_cfg, train_cfg)
  # Committed (like restored arrays, so a resumed run reuses the compiled step) to one device or a mesh.
  state, opt_state = (place_state or on_first_device)(state, opt_state)
  iterator = data.train_iterator(ds)
  ckpt = checkpoint.Checkpointer(out / 'checkpoints', keep=train_cfg.keep_checkpoints)
  try:
    start = ckpt.latest_step() or 0
    if start == train_cfg.steps and (out / 'summary.json').exists():
      return json.loads((out / 'summary.json').read_text())
    if start:
      state, opt_state, data_state, _ = ckpt.restore(start, state, opt_state)
      iterator.set_state(data_state)
      if log:
        log(f'resuming {out} from step {start}')
    metrics_log = MetricsLog(out / 'metrics.jsonl', start, enabled=writer)
    train_step, eval_step = cached_steps(graphdef, train_cfg)
    schedule, tokens_per_step = lr_schedule(train_cfg), train_cfg.tokens_per_step
    eval_row = lambda p: _eval_row(evaluate(eval_step, p, eval_NBT1), corpus.tokenizer == 'bytes')
    if start == 0 and train_cfg.eval_every:
      _emit(metrics_log, log, {'step': 0, 'tokens': 0, **eval_row(state)}, train_cfg.steps, None)

    target = min(train_cfg.steps, stop_at_step or train_cfg.steps)
    step, pending, row, last_eval = start, [], {}, {}
    timed_steps, timed_s, interval_steps, interval_start = 0, 0.0, 0, None
    while step < target:
      batch = next(iterator)
      state, opt_state, metrics = train_step(state, opt_state, place_batch(batch) if place_batch else batch)
      step += 1
      pending.append(metrics)
      if interval_start is None:  # the first step compiles: time from its end
        jax.block_until_ready(metrics)
        interval_start = time.perf_counter()
      else:
        interval_steps += 1
      do_eval = step == train_cfg.steps or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
      do_save = step == target or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0)
      if not (do_eval or do_save or step % train_cfg.log_every == 0):
        continue
      host = jax.device_get(pending)
      elapsed = time.perf_counter() - interval_start
      _check_finite(host, step, state if do_save else None, metrics_log, ckpt)
      timed_steps, timed_s = timed_steps + interval_steps, timed_s + elapsed
      row = {'step': step, 'tokens': step * tokens_per_step, **_mean_metrics(host), 'lr': float(schedule(step - 1))}
      if interval_steps:
        row.update(step_time_s=elapsed / interval_steps, tokens_per_s=interval_steps * tokens_per_step / elapsed)
      if do_eval:
        last_eval = eval_row(state)
        row.update(last_eval)
      _emit(metrics_log, log, row, train_cfg.steps, (target - step) * timed_s / timed_steps if timed_steps else None)
      if do_save:
        ckpt.save(step, state, opt_state, iterator.get_state(), {'tokens': step * tokens_per_step})
      pending, interval_steps, interval_start = [], 0, time.perf_counter()

    if step == start:  # nothing left to train (e.g. killed after the last save): report from the log
      row, last_eval = metrics_log.last('train_loss'), (eval_row(state) if step == train_cfg.steps else {})
    summary = {'step': step, 'tokens': step * tokens_per_step, 'complete': step >= train_cfg.steps,
               'train_loss': row.get('train_loss'), **last_eval, 'unigram_eval_loss': unigram_loss,
               'total_params': counts.total, 'active_params': counts.active,
               'train_flops_per_token': flops_per_token, 'timed_steps': timed_steps}
    if timed_steps:
      summary.update(cost.throughput(tokens_per_step, timed_s / timed_steps, flops_per_token, peak_flops))
    if summary['complete']:
      write_json(out / 'summary.json', summary, writer=writer)
    return summary
  finally:
    ckpt.close()


def on_first_device(state, opt_state):
  """The default placement: committed to the first local device (restored checkpoints come back committed too,
  and a step compiled for uncommitted arrays would be compiled again for them)."""
  return jax.device_put((state, opt_state), jax.local_devices()[0])


def _check_finite(host: list[dict], step: int, state, metrics_log: MetricsLog, ckpt) -> None:
  """Raise NonFiniteLossError (after logging it) unless every loss, gradient norm and parameter is finite."""
  problem = None
  for i, m in enumerate(host):
    if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
      problem = f'step {step - len(host) + 1 + i}: loss {float(m["loss"])}, gradient norm {float(m["grad_norm"])}'
      break
  if problem is None and state is not None and not all_finite(state):
    problem = f'step {step}: model parameters or state are not finite'
  if problem:
    message = (f'{problem}; stopped without saving; the last good checkpoint is step {ckpt.latest_step()} in '
               f'{ckpt.directory}')
    metrics_log.write({'step': step, 'error': message})
    raise NonFiniteLossError(message)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _emit(metrics_log: MetricsLog, log, row: dict, steps: int, eta_s: float | None) -> None:
  metrics_log.write(row)
  if log:
    log(progress_line(row, steps, eta_s))


def _eval_row(eval_loss: float, byte_level: bool) -> dict[str, float]:
  return {'eval_loss': eval_loss, **({'eval_bpb': eval_loss / math.log(2)} if byte_level else {})}


def _mean_metrics(host: list[dict]) -> dict[str, float]:
  """Average per-step metrics over a logging interval, renamed for metrics.jsonl."""
  names = {'ce': 'train_loss', 'loss': 'train_total_loss'}
  row = {names.get(k, k): float(np.mean([m[k] for m in host])) for k in host[0]}
  if 'aux_loss' not in row:  # dense: the total is the cross-entropy
    row.pop('train_total_loss')
  return row
