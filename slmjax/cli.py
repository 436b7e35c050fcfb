"""Architecture flags shared by every script in experiments/, and the error handling they all use.

Every script calls `define_model_flags()` once at import, then `model_config_from_flags()` in main, so
`--arch`, `--experts`, `--d_model` ... mean the same thing in count.py, train.py and sweep.py.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

from slmjax.config import ACTIVATIONS, DISPATCHES, DTYPES, NORMS, ROUTERS, ModelConfig

FLAGS = flags.FLAGS


def define_model_flags() -> None:
  """Define the architecture flags (idempotent, so scripts importing each other do not clash)."""
  if 'arch' in FLAGS:
    return
  d = ModelConfig()
  flags.DEFINE_enum('arch', 'dense', ['dense', 'moe'], 'Feed-forward type: dense FFN or routed experts.')
  flags.DEFINE_integer('experts', 8, 'Routed experts per MoE layer (--arch=moe).')
  flags.DEFINE_integer('k', 2, 'Experts each token is routed to (top-k).')
  flags.DEFINE_integer('vocab_size', d.vocab_size, 'Vocabulary size (256 = bytes).')
  flags.DEFINE_integer('d_model', d.d_model, 'Residual stream width.')
  flags.DEFINE_integer('n_layers', d.n_layers, 'Transformer blocks.')
  flags.DEFINE_integer('n_heads', d.n_heads, 'Query heads.')
  flags.DEFINE_integer('n_kv_heads', None, 'Key/value heads (grouped-query attention); default n_heads.')
  flags.DEFINE_integer('head_dim', None, 'Width of one head; default d_model / n_heads.')
  flags.DEFINE_integer('d_ff', None, 'Dense FFN width; default 4 * d_model.')
  flags.DEFINE_enum('activation', d.activation, list(ACTIVATIONS), 'FFN activation.')
  flags.DEFINE_enum('norm', d.norm, list(NORMS), 'Normalisation layer.')
  flags.DEFINE_boolean('tie_embeddings', d.tie_embeddings, 'Share the input embedding and the output projection.')
  flags.DEFINE_integer('max_seq_len', None, 'Longest sequence the model accepts; default --seq_len.')
  flags.DEFINE_integer('seq_len', d.max_seq_len, 'Training / counting sequence length.')
  flags.DEFINE_enum('dtype', d.dtype, list(DTYPES), 'Compute dtype.')
  flags.DEFINE_enum('param_dtype', d.param_dtype, list(DTYPES), 'Parameter storage dtype.')
  flags.DEFINE_integer('d_expert', None, 'Routed expert FFN width; default d_ff.')
  flags.DEFINE_integer('shared_experts', 0, 'Always-active shared experts per MoE layer.')
  flags.DEFINE_integer('d_shared', None, 'Shared expert width; default d_expert.')
  flags.DEFINE_integer('moe_every', 1, 'Every n-th layer (after --first_dense) is MoE.')
  flags.DEFINE_integer('first_dense', 0, 'The first m layers keep a dense FFN.')
  flags.DEFINE_float('capacity_factor', d.capacity_factor, 'Expert capacity factor; 0 = dropless.')
  flags.DEFINE_integer('group_size', d.group_size, 'Tokens per dispatch group.')
  flags.DEFINE_enum('dispatch', d.dispatch, list(DISPATCHES), 'MoE dispatch implementation.')
  flags.DEFINE_enum('router', d.router, list(ROUTERS), 'Router variant.')
  flags.DEFINE_float('lb_loss_weight', d.lb_loss_weight, 'Load-balancing loss weight.')
  flags.DEFINE_float('z_loss_weight', d.z_loss_weight, 'Router z-loss weight.')


def model_config_from_flags() -> ModelConfig:
  """Build and validate the ModelConfig the flags describe (raises ValueError on nonsense)."""
  f = FLAGS
  moe = f.arch == 'moe'
  if moe and f.experts <= 0:
    raise ValueError(f'--experts={f.experts}: --arch=moe needs at least one expert (or use --arch=dense)')
  return ModelConfig(
      vocab_size=f.vocab_size, d_model=f.d_model, n_layers=f.n_layers, n_heads=f.n_heads,
      n_kv_heads=f.n_kv_heads, head_dim=f.head_dim, d_ff=f.d_ff, activation=f.activation, norm=f.norm,
      tie_embeddings=f.tie_embeddings, max_seq_len=f.max_seq_len or f.seq_len, dtype=f.dtype,
      param_dtype=f.param_dtype,
      n_experts=f.experts if moe else 0, top_k=f.k, d_expert=f.d_expert, n_shared_experts=f.shared_experts,
      d_shared=f.d_shared, moe_every=f.moe_every, first_dense=f.first_dense,
      capacity_factor=f.capacity_factor if f.capacity_factor > 0 else None, group_size=f.group_size,
      dispatch=f.dispatch, router=f.router, lb_loss_weight=f.lb_loss_weight, z_loss_weight=f.z_loss_weight)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, but a ValueError becomes a one-line 'error: ...' on stderr and exit status 2.

  Set SLMJAX_DEBUG=1 to get the full traceback instead.
  """
  def fail(message: str) -> None:
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    sys.exit(2)

  def guarded(argv):
    if not FLAGS['verbosity'].present:  # orbax and grain log every save at INFO; keep the terminal readable
      logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      fail(f'unexpected positional arguments {argv[1:]}; every option is a --flag')
    try:
      main(argv)
    except ValueError as e:
      if os.environ.get('SLMJAX_DEBUG'):
        raise
      fail(str(e))
  app.run(guarded)
