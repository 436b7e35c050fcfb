"""Measured cost: the machine's matmul peak, step time, tokens/s, achieved FLOP/s and model FLOP utilisation.

Peaks are measured on the running device, never looked up: a square matmul (2 n^3 FLOPs) in the model's compute
dtype timed several times, the median kept (a bf16 model's MFU against an f32 peak would read 2-10x high on a
GPU). MFU = achieved FLOP/s / measured peak, with achieved FLOP/s = tokens/s x training FLOPs
per token from `slmjax.counting.train_flops_per_token` (6 N_matmul_active + causal attention; PaLM appendix B).
On a shared or throttled machine both numbers move; report the peak next to every MFU.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from slmjax.kernels import acc32


def block(tree: Any) -> Any:
  """Wait until every array in `tree` is computed (JAX dispatch is asynchronous)."""
  return jax.block_until_ready(tree)


def time_fn(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> dict[str, float]:
  """Median / min / mean seconds of `fn(*args)` over `repeats` calls, after `warmup` (compile) calls."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'mean_s': statistics.fmean(times)}


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(n: int | None = None, dtype: str = 'float32', repeats: int = 10) -> float:
  """FLOP/s of an n x n @ n x n matmul on the default device (median of `repeats`; cached per process), in the
  form the model's layers use (bf16: accumulated in f32, slmjax/kernels/acc32.py). n defaults to 2048 on CPU and
  8192 on accelerators, where a 2048 product is too short to reach the matrix units' rate."""
  n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
  matmul = jax.jit(acc32.matmul)
  return 2 * n ** 3 / time_fn(matmul, a, b, warmup=2, repeats=repeats)['median_s']


def runs_in_memory(fn: Callable[[], Any]) -> bool:
  """Call `fn` once (compiling it) and say whether it fit the device's memory; other errors propagate. A
  benchmark skips what does not fit (a fine-grained einsum dispatch's one-hot tensors at accelerator token
  counts: 64 GiB at 65,536 tokens, E=64) rather than losing every other row."""
  try:
    block(fn())
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return False
  return True


def interleaved_times(fns: dict[str, Callable[[], Any]], warmup: int = 1, repeats: int = 10, inner: int = 1,
                      baseline: str | None = None, max_ratio: float | None = None) -> dict[str, dict[str, float]]:
  """Seconds per call of each thunk, timed round-robin: each round times every thunk in turn, so a slow spell
  of a shared machine (we see 10-30% for minutes) lands on all of them alike and their ratios hold.

  `warmup` untimed rounds first (the first compiles); each sample is the mean of `inner` calls. With a
  `baseline`, each thunk's sample is taken right after a sample of the baseline and `ratio` is the median of
  those paired ratios; a thunk slower than `max_ratio` baselines in its first round is timed only that once.
  Returns {name: {median_s, min_s, mean_s, samples[, ratio]}}.
  """
  def sample(fn, n):
    start = time.perf_counter()
    for _ in range(n):
      out = fn()
    block(out)
    return (time.perf_counter() - start) / n

  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  times = {name: [] for name in fns}
  base = {name: [] for name in fns}
  slow = set()
  for i in range(repeats):
    for name, fn in fns.items():
      if name in slow:
        continue
      n = 1 if i == 0 and baseline else inner
      if baseline:
        base[name].append(sample(fns[baseline], n))
      times[name].append(sample(fn, n))
      if i == 0 and baseline and max_ratio and times[name][0] > max_ratio * base[name][0]:
        slow.add(name)
  stats = {}
  for name, t in times.items():
    stats[name] = {'median_s': statistics.median(t), 'min_s': min(t), 'mean_s': statistics.fmean(t),
                   'samples': len(t)}
    if baseline:
      stats[name]['ratio'] = statistics.median([a / b for a, b in zip(t, base[name])])
  return stats


def time_train_step(step_fn: Callable, state, opt_state, batch, warmup: int = 2, repeats: int = 10
                    ) -> tuple[dict[str, float], Any, Any]:
  """Seconds per call of a (donating) train step `step_fn(state, opt_state, batch) -> (state, opt_state, m)`.

  The state is threaded through the calls (donated buffers cannot be reused), and returned so the caller can
  keep using it.
  """
  run = [step_fn, state, opt_state, batch]
  stats = time_train_steps({'step': run}, warmup, repeats)['step']
  return stats, run[1], run[2]


def time_train_steps(runs: dict[str, list], warmup: int = 2, repeats: int = 10, baseline: str | None = None
                     ) -> dict[str, dict[str, float]]:
  """`interleaved_times` of several train steps, each list [step_fn, state, opt_state, batch] in `runs` threading
  its (donated) state through the calls: the lists are updated in place. `baseline`: paired ratios to it."""
  def thunk(run):
    def call():
      step_fn, state, opt_state, batch = run
      run[1], run[2], metrics = step_fn(state, opt_state, batch)
      return metrics
    return call
  return interleaved_times({name: thunk(run) for name, run in runs.items()}, warmup, repeats, baseline=baseline)


def throughput(tokens_per_step: int, step_time_s: float, flops_per_token: float,
               peak_flops: float | None = None) -> dict[str, float]:
  """tokens/s, achieved FLOP/s and (given a measured peak) MFU for one step time."""
  tokens_per_s = tokens_per_step / step_time_s
  row = {'step_time_s': step_time_s, 'tokens_per_s': tokens_per_s,
         'achieved_flops_per_s': tokens_per_s * flops_per_token}
  if peak_flops:
    row.update(peak_flops_per_s=peak_flops, mfu=row['achieved_flops_per_s'] / peak_flops)
  return row


def compiled_memory(jitted: Callable, *args) -> dict[str, int] | None:
  """Bytes the compiled program needs (`program_memory`) of `jitted` on `args`. None for a plain Python callable
  (no compiled program to read)."""
  if not hasattr(jitted, 'lower'):
    return None
  return program_memory(jitted.lower(*args).compile())


def program_memory(compiled) -> dict[str, int] | None:
  """Bytes a compiled program (`jax.jit(f).lower(...).compile()`) needs (arguments, outputs, temporaries), where
  the backend reports it, and `peak_bytes` = arguments + outputs + temporaries - aliased (donated buffers reused
  for outputs)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  names = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes', 'alias_size_in_bytes',
           'generated_code_size_in_bytes')
  memory = {name: int(getattr(analysis, name)) for name in names if hasattr(analysis, name)}
  memory['peak_bytes'] = (memory.get('argument_size_in_bytes', 0) + memory.get('output_size_in_bytes', 0)
                          + memory.get('temp_size_in_bytes', 0) - memory.get('alias_size_in_bytes', 0))
  return memory


def device_memory_bytes(device=None) -> tuple[int, str]:
  """(bytes a program may use on `device`, where the figure comes from): the allocator's limit on GPU / TPU;
  on CPU the host's available memory (MemAvailable of /proc/meminfo, else the physical memory)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} memory limit'
  try:
    with open('/proc/meminfo') as f:
      available = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    return available, 'available host memory'
  except (OSError, StopIteration):
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'), 'physical host memory'


def check_fits(memory: dict[str, int] | None, what: str, shrink: str) -> None:
  """ValueError (one line: needed, available, what to change) if a compiled program's peak memory
  (`compiled_memory`) exceeds the device's; silent where the backend reports no memory analysis."""
  if not memory:
    return
  available, source = device_memory_bytes()
  if memory['peak_bytes'] > available:
    raise ValueError(f'{what} needs {memory["peak_bytes"] / 1e9:,.2f} GB (XLA memory analysis: arguments '
                     f'{memory.get("argument_size_in_bytes", 0) / 1e9:,.2f} GB, temporaries '
                     f'{memory.get("temp_size_in_bytes", 0) / 1e9:,.2f} GB) but the {source} is '
                     f'{available / 1e9:,.2f} GB; {shrink}')


def tree_bytes(tree: Any) -> int:
  """Bytes held by the arrays of a pytree (e.g. an optimizer state, measured rather than assumed)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure_train_step(step_fn: Callable, state, opt_state, batch, tokens_per_step: int, flops_per_token: float,
                       peak_flops: float | None, memory: dict[str, int] | None) -> tuple[dict, Any, Any]:
  """The measured cost of a (donating) train step on one batch: step time (median of 5 after 2 warm-up calls),
  tokens/s, achieved FLOP/s, MFU, and the peak of `memory` (its `compiled_memory`, which the caller has already
  read, so the step is not lowered again); with the threaded state."""
  stats, state, opt_state = time_train_step(step_fn, state, opt_state, batch, warmup=2, repeats=5)
  measured = throughput(tokens_per_step, stats['median_s'], flops_per_token, peak_flops)
  return {'step_time_s': measured['step_time_s'], 'tokens_per_s': measured['tokens_per_s'],
          'achieved_flops_per_s': measured['achieved_flops_per_s'], 'mfu': measured.get('mfu'),
          'peak_flops_per_s': peak_flops, 'peak_memory_bytes': memory['peak_bytes'] if memory else None
          }, state, opt_state


class StepTimer:
  """Seconds per training step, over logging intervals. The first step compiles and is not timed; time spent
  between `lap()` and `resume()` (evaluation, checkpoints) is not counted either."""

  def __init__(self):
    self.steps, self.seconds = 0, 0.0
    self._interval_steps, self._start = 0, None

  def stepped(self, outputs: Any) -> None:
    """Call after each step is dispatched with its outputs."""
    if self._start is None:
      block(outputs)
      self._start = time.perf_counter()
    else:
      self._interval_steps += 1

  def lap(self) -> tuple[int, float]:
    """(steps, seconds) of the interval ending now; call after the interval's outputs are on the host."""
    steps, elapsed = self._interval_steps, time.perf_counter() - self._start
    self.steps, self.seconds = self.steps + steps, self.seconds + elapsed
    return steps, elapsed

  def resume(self) -> None:
    """Start the next interval (after evaluation or saving)."""
    self._interval_steps, self._start = 0, time.perf_counter()

  @property
  def mean_s(self) -> float | None:
    return self.seconds / self.steps if self.steps else None
