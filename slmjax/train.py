"""The resumable training loop: one experiment in one run directory (slmjax/run_dir.py).

`train()` checks every input before anything is written, then trains with the jitted step of slmjax/steps.py,
logs metrics, evaluates on fixed held-out batches, checkpoints (slmjax/checkpoint.py) and resumes from the
latest checkpoint when called again, seeing exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import flax
import jax
import numpy as np
import optax

from slmjax import checkpoint, cost, counting, data, sharding
from slmjax.config import ModelConfig, TrainConfig
from slmjax.model import abstract_model
from slmjax.optim import lr_schedule, make_optimizer
from slmjax.run_dir import MetricsLog, RunDir
from slmjax.steps import (all_finite, cached_steps, eval_graphdef, evaluate, init_state, make_eval_step,
                          on_first_device)
from slmjax.tensorboard import TensorBoardLog


# Router health at the end of training (the last logged interval's means), kept in the summary as final_<name>.
ROUTER_METRICS = ('drop_fraction', 'expert_load_max_over_mean', 'lb_loss', 'z_loss', 'router_entropy')


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss or gradient; the run stopped without saving."""


def format_duration(seconds: float) -> str:
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
    parts.append(f'ETA {format_duration(eta_s)}')
  return ' | '.join(parts)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | os.PathLike, *,
          stop_at_step: int | None = None, peak_flops: float | None = None,
          log: Callable[[str], None] | None = functools.partial(print, flush=True),
          place_state: Callable | None = None, place_batch: Callable | None = None,
          mesh: jax.sharding.Mesh | None = None, counts: counting.ParamCounts | None = None,
          measure_cost: bool = False, tensorboard: bool = False, init_from=None) -> dict[str, Any]:
  """Train one model in `out_dir`, resuming from its latest checkpoint; returns the final metrics.

  Every input is checked before anything is written. `stop_at_step` ends this call early (checkpointed) as
  if the job were interrupted; calling again continues. `peak_flops` (e.g. `cost.matmul_peak_flops()`) adds MFU.
  `place_state(state, opt_state) -> (state, opt_state)` puts the fresh state on devices (default: committed to
  the first local device; with a mesh, `jax.device_put` with NamedShardings); checkpoints restore into the same
  placement and the jitted step follows it. `place_batch` turns a process-local numpy batch into a (sharded)
  global array; it is needed with several processes. `mesh` (see `slmjax.sharding`) sets both from the
  parameters' logical axis names and runs the step under `jax.set_mesh(mesh)`; only process 0 writes files
  other than checkpoints (which every process writes its shards of). `counts`: the config's parameter counts
  when the caller has them. `measure_cost`: once the run is complete, time its step on a fixed batch and read the
  compiled program's memory (`cost.measure_train_step`), kept in the summary under 'cost'. `tensorboard`: also
  write the metrics as TensorBoard events under `<out_dir>/tensorboard/` (slmjax/tensorboard.py). `init_from`:
  a model state of `model_cfg` (e.g. `slmjax.convert.from_hf`) that a fresh run starts from instead of a random
  initialisation (a resumed run restores its checkpoint as always).
  Before anything is written, the compiled train step's memory is checked against the device's (ValueError).
  Raises NonFiniteLossError if a loss, gradient or parameter is not finite (the last good checkpoint is kept).
  """
  if train_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f'seq_len={train_cfg.seq_len} exceeds the model max_seq_len={model_cfg.max_seq_len}')
  if stop_at_step is not None and stop_at_step <= 0:
    raise ValueError(f'stop_at_step must be positive, got {stop_at_step}')
  if mesh is not None:
    place_state = place_state or functools.partial(sharding.place_state, mesh=mesh,
                                                   tx=make_optimizer(train_cfg))
    place_batch = place_batch or sharding.batch_placer(mesh, train_cfg.batch_size)
    sharding.state_shardings(flax.nnx.state(abstract_model(model_cfg)), mesh)  # a mesh that does not fit: fail now
  if jax.process_count() > 1 and place_batch is None:
    raise ValueError('training with several processes needs a mesh (global arrays from local batches)')
  run = RunDir(out_dir, writer=jax.process_index() == 0)
  done = checkpoint.latest_step(run.checkpoints)
  previous = run.check(model_cfg, train_cfg, checkpointed=done is not None)
  corpus = load_checked_corpus(model_cfg, train_cfg)
  if previous and previous['data']['data_fingerprint'] != corpus.fingerprint:
    raise ValueError(f'data {train_cfg.data!r} changed since the run in {run.path} started (other content)')
  if done is not None and done > train_cfg.steps:
    raise ValueError(f'the run in {run.path} is already at step {done}, past steps={train_cfg.steps}')
  loop = _Loop(model_cfg, train_cfg, run, corpus, counts or counting.analytic_counts(model_cfg), peak_flops, log,
               place_batch, init_from)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return loop.run(place_state or on_first_device, stop_at_step, measure_cost, tensorboard)


class _Loop:
  """The body of `train` once every input is checked (and the mesh, if any, is set)."""

  def __init__(self, model_cfg, train_cfg, run: RunDir, corpus, counts, peak_flops, log, place_batch, init_from):
    self.model_cfg, self.train_cfg, self.run_dir, self.corpus = model_cfg, train_cfg, run, corpus
    self.init_from = init_from
    self.counts, self.peak_flops, self.log, self.place_batch = counts, peak_flops, log, place_batch
    self.flops_per_token = counting.train_flops_per_token(model_cfg, train_cfg.seq_len, counts)
    self.unigram_loss = corpus.unigram_loss()  # config.json and the summary
    T, B = train_cfg.seq_len, train_cfg.batch_size
    self.eval_NBT1 = data.eval_batches(corpus.eval_N, T, B, train_cfg.eval_batches)
    if place_batch is not None:  # the same held-out windows on every process, as one global array each
      self.eval_NBT1 = [place_batch(b, whole=True) for b in self.eval_NBT1]
    self.dataset = data.train_dataset(corpus.train_N, T, B, train_cfg.seed, jax.process_index(), jax.process_count())
    # Built here, outside the mesh context `run` executes in: abstract variables would be laid out on the mesh.
    self.eval_graph = eval_graphdef(model_cfg)

  def run(self, place_state: Callable, stop_at_step: int | None, measure: bool, tensorboard: bool
          ) -> dict[str, Any]:
    model_cfg, train_cfg, run = self.model_cfg, self.train_cfg, self.run_dir
    state, opt_state = self._init_checked(place_state)
    # Every check passed: from here on the run directory is written. A fresh one (or one a kill left before its
    # first checkpoint) that fails before its first checkpoint is removed again: it would hold nothing to resume.
    fresh = (checkpoint.latest_step(run.checkpoints) is None
             and not os.path.exists(checkpoint.aside_dir(run.checkpoints)))
    try:
      run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f'cannot create the run directory {run.path} ({e.strerror}); choose another --out') from None
    try:
      return self._run(state, opt_state, stop_at_step, measure, tensorboard)
    except BaseException:
      if fresh and run.writer and checkpoint.latest_step(run.checkpoints) is None:
        shutil.rmtree(run.path, ignore_errors=True)
      raise

  def _init_checked(self, place_state: Callable):
    """The placed fresh state and compiled steps, after checking the compiled train step fits in the device's
    memory (XLA's memory analysis): a one-line error instead of an out-of-memory crash mid-run."""
    B, T = self.train_cfg.batch_size, self.train_cfg.seq_len
    shrink = ('shrink --batch_size, --seq_len or the model (--d_model, --n_layers, --d_ff, --experts), use '
              '--dtype=bfloat16, or spread it over more devices with --mesh')
    try:
      graphdef, state, _, opt_state = init_state(self.model_cfg, self.train_cfg)
      if self.init_from is not None:
        if jax.tree.structure(self.init_from) != jax.tree.structure(state):
          raise ValueError('init_from: the given state does not have the structure of the model of model_cfg')
        state = self.init_from
      # Committed (like restored arrays, so a resumed run reuses the compiled step) to one device or a mesh.
      state, opt_state = place_state(state, opt_state)
      self.train_step, self.eval_step = cached_steps(graphdef, self.train_cfg, self.eval_graph)
      self.memory = cost.compiled_memory(self.train_step, state, opt_state, self._fixed_batch())  # compiled once
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise ValueError(f'out of memory building the model and its train step ({str(e).splitlines()[0][:200]}); '
                       f'{shrink}') from None
    cost.check_fits(self.memory, f'the train step (batch {B} x seq_len {T})', shrink)
    return state, opt_state

  def _fixed_batch(self):
    """One batch of random tokens of the training shape (placed like training batches): the pre-flight
    compile's input and what the cost measurement times."""
    batch_BT1 = np.random.default_rng(0).integers(0, self.model_cfg.vocab_size, (self.train_cfg.batch_size,
                                                  self.train_cfg.seq_len + 1), dtype=np.int32)
    return self.place_batch(batch_BT1, whole=True) if self.place_batch else batch_BT1

  def _run(self, state, opt_state, stop_at_step, measure, tensorboard) -> dict[str, Any]:
    model_cfg, train_cfg, run = self.model_cfg, self.train_cfg, self.run_dir
    run.write_json(run.config_path, {
        'model': model_cfg.to_dict(), 'train': train_cfg.to_dict(), 'data': self.corpus.summary(),
        'counts': counting.summary(model_cfg, train_cfg.seq_len, self.counts),
        'unigram_eval_loss': self.unigram_loss,
        'devices': [d.device_kind for d in jax.devices()], 'process_count': jax.process_count(),
        'versions': {m.__name__: m.__version__ for m in (jax, optax, flax)}})
    iterator = data.train_iterator(self.dataset)
    with checkpoint.Checkpointer(run.checkpoints, keep=train_cfg.keep_checkpoints) as ckpt:
      finished = run.read_summary() if ckpt.latest_step() == train_cfg.steps else None
      if finished and (not measure or 'cost' in finished):
        return finished
      restored = ckpt.restore_latest(state, opt_state, warn=self.log or _stderr)
      start = 0
      if restored:
        start, state, opt_state, data_state, _ = restored
        iterator.set_state(data_state)
        if self.log:
          self.log(f'resuming {run.path} from step {start}')
      self.logs = (run.metrics(start), TensorBoardLog(run.tensorboard, start, enabled=tensorboard and run.writer))
      try:
        if start == 0 and train_cfg.eval_every:
          self._emit({'step': 0, 'tokens': 0, **self._eval_row(state)}, None)
        target = min(train_cfg.steps, stop_at_step or train_cfg.steps)
        timer = cost.StepTimer()
        state, opt_state, row, last_eval = self._steps(start, target, state, opt_state, iterator, timer, ckpt)
        if target == start:  # nothing left to train (e.g. killed after the last save): report from the log
          row = self.logs[0].last('train_loss')
          last_eval = self._eval_row(state) if start == train_cfg.steps else {}
        return self._summary(target, row, last_eval, timer, state, opt_state, measure)
      finally:
        self.logs[1].close()

  def _steps(self, step, target, state, opt_state, iterator, timer, ckpt):
    """Train from `step` to `target`, logging, evaluating and checkpointing on the way."""
    train_cfg, tokens_per_step = self.train_cfg, self.train_cfg.tokens_per_step
    schedule, pending, row, last_eval = lr_schedule(train_cfg), [], {}, {}
    while step < target:
      batch = next(iterator)
      state, opt_state, metrics = self.train_step(state, opt_state, self.place_batch(batch) if self.place_batch
                                                  else batch)
      step += 1
      pending.append(metrics)
      timer.stepped(metrics)
      do_eval = step == train_cfg.steps or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
      do_save = step == target or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0)
      if not (do_eval or do_save or step % train_cfg.log_every == 0):
        continue
      host = jax.device_get(pending)
      interval_steps, elapsed = timer.lap()
      _check_finite(host, step, state if do_save else None, self.logs[0], ckpt)
      row = {'step': step, 'tokens': step * tokens_per_step, **_mean_metrics(host), 'lr': float(schedule(step - 1))}
      if interval_steps:
        row.update(step_time_s=elapsed / interval_steps, tokens_per_s=interval_steps * tokens_per_step / elapsed)
      if do_eval:
        last_eval = self._eval_row(state)
        row.update(last_eval)
      self._emit(row, (target - step) * timer.mean_s if timer.mean_s else None)
      if do_save:
        ckpt.save(step, state, opt_state, iterator.get_state(), {'tokens': step * tokens_per_step})
      pending = []
      timer.resume()
    return state, opt_state, row, last_eval

  def _summary(self, step, row, last_eval, timer, state, opt_state, measure) -> dict[str, Any]:
    train_cfg, tokens_per_step = self.train_cfg, self.train_cfg.tokens_per_step
    summary = {'step': step, 'tokens': step * tokens_per_step, 'complete': step >= train_cfg.steps,
               'train_loss': row.get('train_loss'), **last_eval, 'unigram_eval_loss': self.unigram_loss,
               'total_params': self.counts.total, 'active_params': self.counts.active,
               'train_flops_per_token': self.flops_per_token, 'timed_steps': timer.steps,
               'optimizer_state_bytes': cost.tree_bytes(opt_state),
               **{f'final_{k}': row[k] for k in ROUTER_METRICS if k in row}}
    if timer.steps:
      summary.update(cost.throughput(tokens_per_step, timer.mean_s, self.flops_per_token, self.peak_flops))
    if summary['complete'] and measure:  # after the last checkpoint: the timed steps are never saved
      started = time.perf_counter()
      summary['cost'], _, _ = cost.measure_train_step(self.train_step, state, opt_state, self._fixed_batch(),
                                                     tokens_per_step, self.flops_per_token, self.peak_flops,
                                                     self.memory)
      if self.log:
        self.log(f'step cost measured in {time.perf_counter() - started:.1f} s')
    if summary['complete']:
      self.run_dir.write_json(self.run_dir.summary_path, summary)
    return summary

  def _eval_row(self, state) -> dict[str, float]:
    return eval_row(self.corpus, evaluate(self.eval_step, state, self.eval_NBT1))

  def _emit(self, row: dict, eta_s: float | None) -> None:
    for log in self.logs:
      log.write(row)
    if self.log:
      self.log(progress_line(row, self.train_cfg.steps, eta_s))


def load_checked_corpus(model_cfg: ModelConfig, train_cfg: TrainConfig) -> data.Corpus:
  """The run's corpus (its tokenizer's tokens), checked to fit the model's vocabulary."""
  corpus = data.load_corpus(train_cfg.data, train_cfg.eval_fraction, tokenizer=train_cfg.tokenizer)
  if corpus.max_token >= model_cfg.vocab_size:
    raise ValueError(f'data {train_cfg.data!r} has token id {corpus.max_token} >= vocab_size={model_cfg.vocab_size}'
                     + ('' if train_cfg.tokenizer else ' (a model imported with its own tokenizer: --tokenizer)'))
  return corpus


def eval_row(corpus: data.Corpus, metrics: dict[str, float]) -> dict[str, float]:
  """Held-out metrics: eval_loss in nats/token, eval_bpb in bits per byte (byte tokens, or a tokenizer's
  corpus: nats over all held-out tokens / their UTF-8 bytes / ln 2, the windows' mean loss standing for the
  stream's), eval_drop_fraction."""
  row = {'eval_loss': metrics['ce']}
  if corpus.tokenizer == 'bytes':
    row['eval_bpb'] = metrics['ce'] / math.log(2)
  elif corpus.eval_bytes:
    row['eval_bpb'] = metrics['ce'] * corpus.eval_N.size / corpus.eval_bytes / math.log(2)
  if 'drop_fraction' in metrics:
    row['eval_drop_fraction'] = metrics['drop_fraction']
  return row


def evaluate_only(model_cfg: ModelConfig, train_cfg: TrainConfig, state) -> dict[str, float]:
  """Held-out metrics (`eval_row`, plus the unigram baseline) of a model state on the run's data, no training:
  an imported model's loss on the data before fine-tuning it."""
  corpus = load_checked_corpus(model_cfg, train_cfg)
  batches_NBT1 = data.eval_batches(corpus.eval_N, train_cfg.seq_len, train_cfg.batch_size, train_cfg.eval_batches)
  eval_step = make_eval_step(eval_graphdef(model_cfg))
  return {**eval_row(corpus, evaluate(eval_step, state, batches_NBT1)), 'unigram_eval_loss': corpus.unigram_loss(),
          'eval_tokens': int(batches_NBT1[..., 1:].size)}


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


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


def _mean_metrics(host: list[dict]) -> dict[str, float]:
  """Average per-step metrics over a logging interval, renamed for metrics.jsonl."""
  names = {'ce': 'train_loss', 'loss': 'train_total_loss'}
  row = {names.get(k, k): float(np.mean([m[k] for m in host])) for k in host[0]}
  if 'aux_loss' not in row:  # dense: the total is the cross-entropy
    row.pop('train_total_loss')
  return row
