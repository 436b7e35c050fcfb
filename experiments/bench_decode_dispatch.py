"""Which dropless dispatch is fastest for a decode step's few tokens: select vs gather vs ragged vs dense, by B * k.

  python experiments/bench_decode_dispatch.py                        # mixtral-512's layer: E=8, k=2, D 256, F 512
  python experiments/bench_decode_dispatch.py --experts=64 --top_k=8 --d_expert=64 --tokens=1,2,4,8,16,32,64
  python experiments/bench_decode_dispatch.py --json

One MoE layer's dispatch (the expert FFNs and the row moves, no router) on X tokens, each routed to k distinct
random experts, float32, forward only (what a decode step runs), for X = the batch of a decode step. `select`
gathers each assignment's expert weights (X * k weight copies), `gather` with capacity X (dropless) runs every
expert on the rows of its busiest one, `ragged` runs every expert on its own rows in row tiles (128 on CPU),
`dense` runs every expert on every token (E / k times the FLOPs, but each weight read once). The calls of
every implementation are timed round-robin, each sample the mean of --inner calls; medians of --repeats samples.
`slmjax.dispatch.select` uses what this measures to pick its implementation by X * k (README, "Decode").
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from slmjax import cli, cost, dispatch
from slmjax.dispatch.experts import ExpertWeights

IMPLS = ('select', 'gather', 'ragged', 'dense')

flags.DEFINE_list('tokens', ['1', '2', '4', '8', '16', '32', '64', '128', '256'], 'Tokens X of a step (the batch).')
flags.DEFINE_list('impls', list(IMPLS), 'Dispatch implementations to time.')
flags.DEFINE_integer('experts', 8, 'Experts E.')
flags.DEFINE_integer('top_k', 2, 'Experts a token k.')
flags.DEFINE_integer('d_model', 256, 'Model width D.')
flags.DEFINE_integer('d_expert', 512, 'Expert width F.')
flags.DEFINE_integer('repeats', 5, 'Timed samples per implementation; the median is reported.')
flags.DEFINE_integer('inner', 10, 'Calls per timed sample.')
flags.DEFINE_boolean('json', False, 'Print one JSON list of rows instead of a table.')
FLAGS = flags.FLAGS


def time_tokens(X: int, E: int, A: int, D: int, F: int, impls, repeats: int, inner: int) -> dict[str, float]:
  """Median seconds of one dispatch call per implementation, on X tokens with k = A random distinct experts."""
  rng = np.random.default_rng(X)
  w = ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))))
  x_GSD = jnp.asarray(rng.normal(size=(1, X, D)), jnp.float32)
  experts_GSA = jnp.asarray(np.argsort(rng.uniform(size=(1, X, E)), axis=-1)[..., :A], jnp.int32)
  gates_GSA = jnp.asarray(rng.uniform(0.1, 1, size=(1, X, A)), jnp.float32)
  calls = {name: jax.jit(lambda x, g, e, w, f=dispatch.DISPATCH[name]: f(x, g, e, w, X, 'swiglu')[0])
           for name in impls}
  args = (x_GSD, gates_GSA, experts_GSA, w)
  outputs = {name: cost.block(call(*args)) for name, call in calls.items()}  # compiles
  for name, y in outputs.items():  # the same layer output, or the timing compares different work
    np.testing.assert_allclose(y, outputs[impls[0]], atol=1e-4, rtol=1e-4, err_msg=name)
  samples = {name: [] for name in impls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        y = call(*args)
      cost.block(y)
      samples[name].append((time.perf_counter() - t0) / inner)
  return {name: statistics.median(s) for name, s in samples.items()}


def main(argv):
  del argv
  impls = tuple(FLAGS.impls)
  unknown = sorted(set(impls) - set(IMPLS))
  if unknown:
    raise ValueError(f'--impls: unknown {", ".join(unknown)}; known: {", ".join(IMPLS)}')
  try:
    tokens = [int(t) for t in FLAGS.tokens]
  except ValueError:
    raise ValueError(f'--tokens must be comma-separated integers, got {",".join(FLAGS.tokens)}') from None
  if not impls or not tokens:
    raise ValueError('--impls and --tokens need at least one value each')
  if min(tokens) < 1 or not 1 <= FLAGS.top_k <= FLAGS.experts:
    raise ValueError(f'--tokens must be >= 1 and 1 <= --top_k <= --experts, got {tokens} and {FLAGS.top_k}')
  if min(FLAGS.repeats, FLAGS.inner, FLAGS.d_model, FLAGS.d_expert) < 1:
    raise ValueError('--repeats, --inner, --d_model and --d_expert must be positive')
  rows = []
  for X in tokens:
    seconds = time_tokens(X, FLAGS.experts, FLAGS.top_k, FLAGS.d_model, FLAGS.d_expert, impls, FLAGS.repeats,
                          FLAGS.inner)
    rows.append({'tokens': X, 'assignments': X * FLAGS.top_k, 'experts': FLAGS.experts, 'top_k': FLAGS.top_k,
                 'd_model': FLAGS.d_model, 'd_expert': FLAGS.d_expert, 'fastest': min(seconds, key=seconds.get),
                 **{f'{name}_us': s * 1e6 for name, s in seconds.items()}})
    if not FLAGS.json:
      print(f'X={X:<4} X*k={X * FLAGS.top_k:<5} ' + '  '.join(f'{n} {s * 1e6:>8.0f} us' for n, s in seconds.items())
            + f'   fastest: {rows[-1]["fastest"]}', flush=True)
  if FLAGS.json:
    print(json.dumps(rows))


if __name__ == '__main__':
  cli.run(main)
