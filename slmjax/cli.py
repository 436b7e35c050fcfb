"""Architecture flags shared by every script in experiments/, and the error handling they all use.

Every script calls `define_model_flags()` once at import, then `model_config_from_flags()` in main, so
`--arch`, `--experts`, `--d_model` ... mean the same thing in count.py, train.py and sweep.py.
`--preset=NAME` (see slmjax/presets.py) replaces the architecture flags by a published model, `--scale_down` by
its small twin; only the runtime flags (RUNTIME_FLAGS: dtypes, dispatch, capacity, sequence length) still apply.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

from slmjax import presets
from slmjax.config import ACTIVATIONS, ATTENTIONS, DISPATCHES, DTYPES, NORMS, QK_NORMS, ROUTERS, ModelConfig

FLAGS = flags.FLAGS
RUNTIME_FLAGS = ('dtype', 'param_dtype', 'capacity_factor', 'group_size', 'dispatch', 'lb_loss_weight',
                 'z_loss_weight', 'max_seq_len', 'seq_len')
ARCH_FLAGS = ('arch', 'experts', 'k', 'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff',
              'activation', 'norm', 'tie_embeddings', 'd_expert', 'shared_experts', 'd_shared', 'moe_every',
              'first_dense', 'router', 'attention', 'q_lora_rank', 'kv_lora_rank', 'qk_rope_dim', 'v_head_dim',
              'qkv_bias', 'o_bias', 'qk_norm', 'post_norms', 'lm_head_bias', 'router_bias', 'routed_scale',
              'shared_gate')


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
  flags.DEFINE_enum('attention', d.attention, list(ATTENTIONS), 'gqa (MHA/GQA/MQA) or mla (DeepSeek latent).')
  flags.DEFINE_integer('q_lora_rank', d.q_lora_rank, 'MLA: query latent rank; 0 = full-rank query.')
  flags.DEFINE_integer('kv_lora_rank', None, 'MLA: key/value latent rank; default 4 * head_dim.')
  flags.DEFINE_integer('qk_rope_dim', None, 'MLA: rotary width per head; default head_dim / 2.')
  flags.DEFINE_integer('v_head_dim', None, 'MLA: value width per head; default head_dim.')
  flags.DEFINE_boolean('qkv_bias', d.qkv_bias, 'Biases on the q, k, v projections.')
  flags.DEFINE_boolean('o_bias', d.o_bias, 'Bias on the attention output projection.')
  flags.DEFINE_enum('qk_norm', d.qk_norm, list(QK_NORMS), 'QK-norm: per head, over the full projection, or none.')
  flags.DEFINE_boolean('post_norms', d.post_norms, 'Also norm each sublayer output (Gemma 2: 4 norms a block).')
  flags.DEFINE_boolean('lm_head_bias', d.lm_head_bias, 'Bias on the output projection.')
  flags.DEFINE_boolean('router_bias', d.router_bias, 'Selection-only router bias (--router=sigmoid).')
  flags.DEFINE_float('routed_scale', d.routed_scale, 'Scale of the routed experts\' output.')
  flags.DEFINE_boolean('shared_gate', d.shared_gate, 'Per-token sigmoid gate on the shared experts.')
  flags.DEFINE_string('preset', None, f'A published architecture ({", ".join(presets.names())}); fixes the '
                      'architecture flags. count.py also takes "all".')
  flags.DEFINE_boolean('scale_down', False, 'With --preset: the same architecture at small dimensions.')


def model_config_from_flags() -> ModelConfig:
  """Build and validate the ModelConfig the flags describe (raises ValueError on nonsense)."""
  f = FLAGS
  if f.preset:
    return preset_config_from_flags(f.preset)
  if f.scale_down:
    raise ValueError('--scale_down needs --preset=NAME')
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
      dispatch=f.dispatch, router=f.router, lb_loss_weight=f.lb_loss_weight, z_loss_weight=f.z_loss_weight,
      attention=f.attention, q_lora_rank=f.q_lora_rank, kv_lora_rank=f.kv_lora_rank, qk_rope_dim=f.qk_rope_dim,
      v_head_dim=f.v_head_dim, qkv_bias=f.qkv_bias, o_bias=f.o_bias, qk_norm=f.qk_norm, post_norms=f.post_norms,
      lm_head_bias=f.lm_head_bias, router_bias=f.router_bias, routed_scale=f.routed_scale,
      shared_gate=f.shared_gate)


def reject_arch_flags(preset: str) -> None:
  """A preset fixes the architecture: an architecture flag given with it is an error, not silently ignored."""
  fixed = [flag for flag in ARCH_FLAGS if FLAGS[flag].present]
  if fixed:
    raise ValueError(f'--{fixed[0]} cannot change --preset={preset}; only --{", --".join(RUNTIME_FLAGS)} apply to '
                     'a preset')


def preset_config_from_flags(name: str) -> ModelConfig:
  """Preset `name` (scaled down with --scale_down), with the runtime flags given on the command line applied."""
  f = FLAGS
  reject_arch_flags(name)
  cfg = presets.get(name)
  if f.scale_down:
    cfg = presets.scale_down(cfg)
  return apply_runtime_flags(cfg)


def apply_runtime_flags(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with the runtime flags given on the command line (dtypes, dispatch, capacity, seq_len) applied."""
  f = FLAGS
  changes = {flag: f[flag].value for flag in RUNTIME_FLAGS if f[flag].present and flag != 'seq_len'}
  if 'capacity_factor' in changes and changes['capacity_factor'] <= 0:
    changes['capacity_factor'] = None
  if f['seq_len'].present and not f['max_seq_len'].present:
    changes['max_seq_len'] = max(cfg.max_seq_len, f.seq_len)
  return cfg.replace(**changes)


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
