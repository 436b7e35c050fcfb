"""Frozen configuration: ModelConfig (dense and Mixture-of-Experts in one) and TrainConfig, the one source of truth.

A dense model is `n_experts == 0`; every other field means the same thing for both, so a dense and an MoE
config that differ only in the MoE fields build models that differ only in their feed-forward blocks.
Every field carries its help text (and its choices) as metadata, from which `slmjax.cli` generates the command-line
flags, so a field cannot exist without a flag. Validation happens in `__post_init__` and raises `ValueError` with
a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ACTIVATIONS = ('swiglu', 'geglu', 'gelu')
NORMS = ('rmsnorm', 'layernorm')
ROUTERS = ('softmax_topk', 'topk_softmax', 'sigmoid', 'sparsemixer')
BALANCES = ('aux_loss', 'bias', 'both')
ATTENTIONS = ('gqa', 'mla')
QK_NORMS = ('none', 'head', 'full')
DISPATCHES = ('auto', 'einsum', 'gather', 'ragged', 'dense', 'select', 'alltoall')
DTYPES = ('float32', 'bfloat16', 'float16')
MATMULS = ('auto', 'xla', 'mkl', 'onednn')
SCHEDULES = ('cosine', 'wsd')
ROPE_SCALINGS = ('none', 'linear', 'llama3', 'yarn', 'longrope')


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, runtime: bool = False,
           zero_is_none: bool = False) -> Any:
  """A config field with its flag's metadata: `help`, `choices`; `runtime` fields may be set on a preset (they
  change how a model runs, not what it is); `zero_is_none`: the flag's value 0 stands for None."""
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices, 'runtime': runtime,
                                                      'zero_is_none': zero_is_none})


class ConfigDict:
  """Serialisation shared by the frozen config dataclasses (config.json of a run, results rows)."""

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON keeps them (tuples as lists), so a dict read back from a file compares equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f'unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}')
    return cls(**data)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigDict):
  """Architecture of one decoder-only Transformer (dense or MoE).

  Derived sizes (`None` means "derive"): `n_kv_heads` defaults to `n_heads` (plain multi-head attention),
  `head_dim` to `d_model // n_heads`, `d_ff` to `4 * d_model`, `d_expert` to `d_ff`, `d_shared` to `d_expert`.
  Read them through the `kv_heads`, `head_size`, `ffn_size`, `expert_size` and `shared_size` properties.
  With `attention='mla'` (DeepSeek V2/V3 Multi-head Latent Attention) `head_dim` is the per-head q/k width
  without rotary (qk_nope_head_dim); `kv_lora_rank` defaults to 4 * head_dim, `qk_rope_dim` to head_dim // 2 and
  `v_head_dim` to head_dim (DeepSeek's 512 / 64 / 128 for head_dim 128); read `qk_head_size`, `v_head_size`,
  `rope_size`, `kv_rank`. Every feature field defaults to "off", so older configs build the same model.
  """

  # Shared by both architectures.
  vocab_size: int = option(256, 'Vocabulary size (256 = bytes).')
  d_model: int = option(128, 'Residual stream width.')
  n_layers: int = option(4, 'Transformer blocks.')
  n_heads: int = option(4, 'Query heads.')
  n_kv_heads: int | None = option(None, 'Key/value heads (grouped-query attention); default n_heads.')
  head_dim: int | None = option(None, 'Width of one head; default d_model / n_heads (MLA: the part without rotary).')
  d_ff: int | None = option(None, 'Dense FFN width; default 4 * d_model.')
  activation: str = option('swiglu', 'FFN activation.', choices=ACTIVATIONS)
  norm: str = option('rmsnorm', 'Normalisation layer.', choices=NORMS)
  norm_eps: float = option(1e-6, 'Epsilon of every norm.')
  rope_theta: float = option(10_000.0, 'Base of the rotary position frequencies.')
  tie_embeddings: bool = option(True, 'Share the input embedding and the output projection.')
  lm_head_bias: bool = option(False, 'A bias on the output projection (Phi-3.5-MoE).')
  embed_scale: bool = option(False, 'Multiply input embeddings by sqrt(d_model) (Gemma).')
  logit_softcap: float = option(0.0, 'Final logits -> cap * tanh(logits / cap) (Gemma 2: 30); 0 = off.')
  post_norms: bool = option(False, "Also norm each sublayer's output before the residual add (Gemma 2: 4 norms a "
                            'block).')
  max_seq_len: int = option(256, 'Longest sequence the model accepts; default (flags) --seq_len.', runtime=True)
  dtype: str = option('float32', 'Compute dtype of activations and matmuls.', choices=DTYPES, runtime=True)
  param_dtype: str = option('float32', 'Storage dtype of parameters.', choices=DTYPES, runtime=True)
  matmul: str = option('auto', "The dense layers' and the dropless expert tiles' matmuls: xla = XLA's dot; mkl / "
                       'onednn = oneMKL / oneDNN through an FFI custom call (XLA:CPU, the [mkl] / [onednn] extra; '
                       'bf16 on the bf16 matrix units where the library uses them), XLA\'s dot with a notice where '
                       'it cannot run; auto = the bf16 backward\'s large products (dy w^T, x^T dy) in oneDNN on one '
                       'CPU device where it loads, every other product in XLA\'s dot, silently '
                       '(slmjax/kernels/gemm.py), and on one CPU device slmjax\'s own calls for narrow SwiGLU FFNs '
                       'and for causal attention (slmjax/kernels/); any other value keeps those in XLA\'s ops.',
                       choices=MATMULS, runtime=True)

  # Attention variants.
  attention: str = option('gqa', 'gqa: MHA / GQA / MQA by n_kv_heads; mla: Multi-head Latent Attention (DeepSeek '
                          'V2).', choices=ATTENTIONS)
  qkv_bias: bool = option(False, 'Biases on the q, k, v projections (Qwen2, Phi-3.5-MoE).')
  o_bias: bool = option(False, 'Bias on the attention output projection (Phi-3.5-MoE).')
  qk_norm: str = option('none', 'QK-norm: head = one norm over head_dim shared by all heads (Qwen3); full = over '
                        'all heads (OLMoE).', choices=QK_NORMS)
  attn_softcap: float = option(0.0, 'Attention logits -> cap * tanh(logits / cap) (Gemma 2: 50); 0 = off.')
  q_lora_rank: int = option(0, 'MLA: rank of the low-rank query path (DeepSeek V3: 1536); 0 = full-rank query.')
  kv_lora_rank: int | None = option(None, 'MLA: rank of the compressed key/value latent; default 4 * head_dim.')
  qk_rope_dim: int | None = option(None, 'MLA: rotary part of each q/k head (one rotary key shared by all heads); '
                                   'default head_dim / 2.')
  v_head_dim: int | None = option(None, 'MLA: width of each value head; default head_dim.')

  # Options that published checkpoints need (slmjax.convert: Llama 3.x, Mistral, Gemma 2); all off by default.
  norm_plus_one: bool = option(False, 'Norm gains stored zero-centred and applied as (1 + scale) (Gemma).')
  query_pre_attn_scalar: float = option(0.0, 'Attention logits scaled by this ** -0.5 instead of head_dim ** -0.5 '
                                        '(Gemma 2: 256); 0 = head_dim.')
  sliding_window: int = option(0, 'Local attention: a query sees only the last sliding_window keys, itself '
                               'included (Mistral 4096, Gemma 2 4096); 0 = off.')
  sliding_every: int = option(1, 'With sliding_window: layer i is local when i % sliding_every == 0, the others '
                              'global (Mistral 1 = all local; Gemma 2: 2).')
  rope_scaling: str = option('none', 'Rotary frequency scaling: linear = every frequency divided by rope_factor '
                             '(position interpolation); llama3 = Llama 3.1 long-context scaling by rope_factor '
                             'between the low/high frequency wavelengths.', choices=ROPE_SCALINGS)
  rope_factor: float = option(8.0, 'rope_scaling: divide the low frequencies by this (Llama 3.1: 8).')
  rope_low_freq_factor: float = option(1.0, 'rope_scaling=llama3: wavelengths above original_len / this are '
                                       'scaled fully (Llama 3.1: 1).')
  rope_high_freq_factor: float = option(4.0, 'rope_scaling=llama3: wavelengths below original_len / this are '
                                        'kept (Llama 3.1: 4).')
  rope_original_max_len: int = option(8192, 'rope_scaling: the context length of pre-training (Llama 3.1: 8192).')
  rope_beta_fast: float = option(32.0, 'rope_scaling=yarn: frequencies turning more than this often over '
                                 'rope_original_max_len keep their value (YaRN alpha/beta; 32).')
  rope_beta_slow: float = option(1.0, 'rope_scaling=yarn: frequencies turning less than this often are divided by '
                                 'rope_factor; those between, a linear ramp (1).')
  rope_truncate: bool = option(True, 'rope_scaling=yarn: round the ramp\'s ends to whole dimensions (transformers '
                               '`truncate`; gpt-oss: False).')
  rope_attention_factor: float = option(1.0, 'rope_scaling=yarn|longrope: cos and sin multiplied by this '
                                        '(transformers attention_factor, Phi mscale; YaRN 0.1 ln(factor) + 1).')
  rope_mscale_all_dim: float = option(0.0, 'rope_scaling=yarn, DeepSeek: attention logits also scaled by '
                                      '(0.1 * this * ln(rope_factor) + 1) ** 2 (DeepSeek-V3: 1.0); 0 = off.')
  rope_short_factor: tuple[float, ...] = option((), 'rope_scaling=longrope: each of the rope_dim / 2 frequencies '
                                                'divided by these (comma-separated) for contexts up to '
                                                'rope_original_max_len.')
  rope_long_factor: tuple[float, ...] = option((), 'rope_scaling=longrope: the divisors for longer contexts (the '
                                               'forward\'s length, or the KV cache\'s when decoding).')

  # Mixture-of-Experts; n_experts == 0 is a dense model and the fields below are ignored.
  n_experts: int = option(0, 'Routed experts per MoE layer; 0 = a dense model (flag: --experts, with --arch=moe).')
  top_k: int = option(2, 'Experts each token is routed to.')
  d_expert: int | None = option(None, 'Routed expert FFN width; default d_ff.')
  n_shared_experts: int = option(0, 'Always-active shared experts per MoE layer.')
  d_shared: int | None = option(None, 'Shared expert width; default d_expert.')
  moe_every: int = option(1, 'Layer i (after the dense prefix) is MoE when (i - first_dense) % moe_every == 0.')
  first_dense: int = option(0, 'The first layers that keep a dense FFN (DeepSeek style).')
  capacity_factor: float | None = option(
      1.25, 'Expert capacity factor: slots = ceil(cf * S * k / E) per group; None (flag: 0) = dropless.',
      runtime=True, zero_is_none=True)
  eval_capacity_factor: float | None = option(
      None, 'Capacity factor when evaluating; None (flag: 0) = dropless. Evaluating at the training capacity drops '
      'held-out tokens (3% at cf 1.25, +0.04 nats on the cpu ladder); GShard and Switch evaluate with more.',
      runtime=True, zero_is_none=True)
  group_size: int = option(512, 'Tokens per dispatch group (S); keeps the [G,S,E,C] one-hot tensors small.',
                           runtime=True)
  dispatch: str = option('auto', 'MoE dispatch implementation; auto = alltoall on a mesh with expert > 1, else '
                         'gather with a capacity factor, ragged dropless (see slmjax.dispatch).',
                         choices=DISPATCHES, runtime=True)
  router: str = option('softmax_topk', 'Router variant.', choices=ROUTERS)
  router_renormalize: bool = option(True, 'softmax_topk, sigmoid: rescale the k kept gates to sum to one.')
  router_bias: bool = option(False, 'A selection-only router bias, not trained by gradients: added to the scores '
                             'that pick the top_k, not to the gates (DeepSeek V3; --balance moves it).')
  routed_scale: float = option(1.0, "Multiply the routed experts' output (DeepSeek routed_scaling_factor).")
  shared_gate: bool = option(False, "Shared experts' output times sigmoid(x . w), w of shape [D] (Qwen MoE).")
  # Routing of published MoE families (DeepSeek's group-limited routing, Phi-3.5-MoE's sparsemixer).
  router_groups: int = option(1, 'Split the experts into this many equal groups and route each token only within '
                              'its router_topk_groups best ones (DeepSeek): a group scores its best expert '
                              '(softmax routers; V2 group_limited_greedy) or the sum of its two best biased sigmoid '
                              'scores (router=sigmoid; V3 noaux_tc); 1 = off.')
  router_topk_groups: int = option(1, 'With router_groups > 1: the groups each token may route into.')
  sparsemixer_eps: float = option(0.01, 'router=sparsemixer (Phi-3.5-MoE, top_k 2): each gate is a softmax over '
                                  'the experts within a relative 2 * eps of the chosen logit (router_jitter_noise).')
  lb_loss_weight: float = option(0.01, 'Load-balancing loss weight.', runtime=True)
  z_loss_weight: float = option(0.001, 'Router z-loss weight.', runtime=True)
  balance: str = option('aux_loss', 'Expert load balancing: aux_loss = the load-balancing loss (lb_loss_weight); '
                        'bias = auxiliary-loss-free (DeepSeek V3): the router_bias moves after each step, the loss '
                        'weight counts as 0; both = the bias and the loss (flags: bias|both turn --router_bias '
                        'on).', choices=BALANCES, runtime=True)
  bias_update_rate: float = option(0.001, 'With balance=bias|both: the selection bias step, bias += rate * '
                                   'sign(mean load - load) (DeepSeek V3 gamma).', runtime=True)

  def __post_init__(self):
    check_integers(self, minimum=1, names=('vocab_size', 'd_model', 'n_layers', 'n_heads', 'max_seq_len',
                                           'group_size', 'moe_every'))
    check_integers(self, minimum=1, or_none=True, names=('n_kv_heads', 'head_dim', 'd_ff', 'd_expert', 'd_shared',
                                                         'kv_lora_rank', 'qk_rope_dim', 'v_head_dim'))
    check_choices(self)
    check_integers(self, minimum=0, names=('sliding_window',))
    check_integers(self, minimum=1, names=('sliding_every', 'rope_original_max_len'))
    if self.query_pre_attn_scalar < 0:
      raise ValueError(f'query_pre_attn_scalar must be >= 0 (0 = head_dim), got {self.query_pre_attn_scalar}')
    self.check_rope_scaling()
    if self.sliding_window and self.attention == 'mla':
      raise ValueError('sliding_window is not supported with attention=mla; set sliding_window=0')
    if self.attention == 'mla':
      if self.n_kv_heads not in (None, self.n_heads):
        raise ValueError('attention=mla has no kv heads to group: leave n_kv_heads unset')
      if self.qkv_bias or self.qk_norm != 'none':
        raise ValueError('attention=mla supports neither qkv_bias nor qk_norm (it norms its latents instead)')
    if not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0:
      raise ValueError(f'q_lora_rank must be an integer >= 0 (0 = full-rank query), got {self.q_lora_rank!r}')
    for name in ('attn_softcap', 'logit_softcap'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0 (0 = off), got {getattr(self, name)}')
    if self.n_heads % self.kv_heads:
      raise ValueError(f'n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)')
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f'n_heads={self.n_heads} must divide d_model={self.d_model}, or set head_dim explicitly')
    if self.rope_size % 2:
      name = 'qk_rope_dim' if self.attention == 'mla' else 'head_dim'
      raise ValueError(f'{name}={self.rope_size} must be even for rotary position embeddings')
    if self.norm_eps <= 0 or self.rope_theta <= 0:
      raise ValueError('norm_eps and rope_theta must be positive')
    if self.n_experts < 0:
      raise ValueError(f'n_experts must be >= 0 (0 means a dense model), got {self.n_experts}')
    if self.n_experts:
      if not 1 <= self.top_k <= self.n_experts:
        raise ValueError(f'top_k={self.top_k} must be between 1 and n_experts={self.n_experts}')
      for name in ('capacity_factor', 'eval_capacity_factor'):
        if getattr(self, name) is not None and getattr(self, name) <= 0:
          raise ValueError(f'{name} must be positive or None (dropless; flag: 0), got {getattr(self, name)}')
      if self.n_shared_experts < 0:
        raise ValueError(f'n_shared_experts must be >= 0, got {self.n_shared_experts}')
      if not 0 <= self.first_dense <= self.n_layers:
        raise ValueError(f'first_dense={self.first_dense} must be between 0 and n_layers={self.n_layers}')
      if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
        raise ValueError('no layer is MoE: lower first_dense or moe_every, or set n_experts=0 for a dense model')
      if self.router == 'topk_softmax' and self.top_k == 1:
        raise ValueError('router=topk_softmax with top_k=1 gives every token gate 1.0 and no router gradient; '
                         'use router=softmax_topk')
      if self.router == 'sigmoid' and self.top_k == 1 and self.router_renormalize:
        raise ValueError('router=sigmoid with top_k=1 and router_renormalize gives gate 1.0 and no router '
                         'gradient; set router_renormalize=False (Llama 4)')
      if self.balance != 'aux_loss' and not self.router_bias:
        raise ValueError(f'balance={self.balance} needs router_bias=True, the selection bias it moves (flag: '
                         '--router_bias; a preset without one can only use balance=aux_loss)')
      if self.shared_gate and not self.n_shared_experts:
        raise ValueError('shared_gate needs n_shared_experts > 0')
      self.check_routing()
      if self.routed_scale <= 0:
        raise ValueError(f'routed_scale must be positive, got {self.routed_scale}')
    for name in ('lb_loss_weight', 'z_loss_weight', 'bias_update_rate'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')

  def check_rope_scaling(self) -> None:
    """ValueError (one line) for rotary scaling settings that cannot scale; the factor lists become tuples (a
    config read from JSON stays hashable and compares equal)."""
    for name in ('rope_short_factor', 'rope_long_factor'):
      object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
    if self.rope_scaling == 'linear' and not self.rope_factor > 0:
      raise ValueError(f'rope_scaling=linear needs rope_factor > 0, got {self.rope_factor}')
    if self.rope_scaling == 'llama3' and not (self.rope_factor > 0 and
                                              0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ValueError(f'rope_scaling=llama3 needs rope_factor > 0 and 0 < rope_low_freq_factor < '
                       f'rope_high_freq_factor, got {self.rope_factor}, {self.rope_low_freq_factor}, '
                       f'{self.rope_high_freq_factor}')
    if self.rope_scaling == 'yarn' and not (self.rope_factor > 0 and self.rope_beta_fast >= self.rope_beta_slow > 0):
      raise ValueError(f'rope_scaling=yarn needs rope_factor > 0 and rope_beta_fast >= rope_beta_slow > 0, got '
                       f'{self.rope_factor}, {self.rope_beta_fast}, {self.rope_beta_slow}')
    if self.rope_scaling == 'longrope':
      for name in ('rope_short_factor', 'rope_long_factor'):
        factors = getattr(self, name)
        if len(factors) != self.rope_size // 2 or min(factors, default=0) <= 0:
          raise ValueError(f'rope_scaling=longrope needs {name} of rope_dim / 2 = {self.rope_size // 2} positive '
                           f'numbers, got {len(factors)}')
    if self.rope_attention_factor <= 0 or self.rope_mscale_all_dim < 0:
      raise ValueError(f'rope_attention_factor must be > 0 and rope_mscale_all_dim >= 0, got '
                       f'{self.rope_attention_factor}, {self.rope_mscale_all_dim}')

  def check_routing(self) -> None:
    """ValueError (one line) for group-limited routing or sparsemixer settings that cannot route."""
    check_integers(self, minimum=1, names=('router_groups', 'router_topk_groups'))
    G, kept = self.router_groups, self.router_topk_groups
    if self.n_experts % G:
      raise ValueError(f'router_groups={G} must divide n_experts={self.n_experts}')
    if kept > G:
      raise ValueError(f'router_topk_groups={kept} must be at most router_groups={G}')
    if G > 1 and kept * (self.n_experts // G) < self.top_k:
      raise ValueError(f'top_k={self.top_k} does not fit router_topk_groups={kept} groups of '
                       f'{self.n_experts // G} experts; raise router_topk_groups')
    if G > 1 and self.router == 'sigmoid' and self.n_experts // G < 2:
      raise ValueError('router=sigmoid scores a group by its two best experts: give each group at least 2 '
                       '(lower router_groups)')
    if self.router == 'sparsemixer':
      if self.top_k != 2 or G > 1 or self.router_bias:
        raise ValueError('router=sparsemixer routes top_k=2 without router_groups or router_bias')
      if self.sparsemixer_eps < 0:
        raise ValueError(f'sparsemixer_eps must be >= 0, got {self.sparsemixer_eps}')

  # Derived sizes.
  def window(self, layer: int) -> int:
    """The sliding window of block `layer` (0-based): sliding_window on local layers, 0 (global) otherwise."""
    return self.sliding_window if self.sliding_window and layer % self.sliding_every == 0 else 0

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rope_size(self) -> int:
    """Rotary width per head: head_dim, or qk_rope_dim for MLA."""
    if self.attention == 'mla':
      return self.qk_rope_dim or self.head_size // 2
    return self.head_size

  @property
  def qk_head_size(self) -> int:
    """Width of one query/key head in the attention logits (MLA: no-rope part + rotary part)."""
    return self.head_size + self.rope_size if self.attention == 'mla' else self.head_size

  @property
  def attention_scale(self) -> float:
    """What attention logits are multiplied by: query_pre_attn_scalar ** -0.5 (Gemma 2), else qk_head_size ** -0.5;
    with rope_mscale_all_dim (DeepSeek's YaRN), times yarn_mscale(rope_factor, rope_mscale_all_dim) ** 2."""
    scale = (self.query_pre_attn_scalar or self.qk_head_size) ** -0.5
    if self.rope_scaling == 'yarn' and self.rope_mscale_all_dim:
      scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
    return scale

  @property
  def v_head_size(self) -> int:
    return (self.v_head_dim or self.head_size) if self.attention == 'mla' else self.head_size

  @property
  def kv_rank(self) -> int:
    """MLA: width of the compressed key/value latent."""
    return self.kv_lora_rank or 4 * self.head_size

  @property
  def ffn_size(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def expert_size(self) -> int:
    return self.d_expert or self.ffn_size

  @property
  def shared_size(self) -> int:
    return self.d_shared or self.expert_size

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """Whether block `layer` (0-based) carries the routed expert FFN."""
    if not self.is_moe or layer < self.first_dense:
      return False
    return (layer - self.first_dense) % self.moe_every == 0

  @property
  def n_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.n_layers))

  def for_eval(self) -> 'ModelConfig':
    """This model as it is evaluated: the same parameters, capacity `eval_capacity_factor`."""
    return self.replace(capacity_factor=self.eval_capacity_factor)

  @property
  def moves_selection_bias(self) -> bool:
    """Whether the train step balances the experts by moving the router's selection bias (balance=bias|both)."""
    return self.is_moe and self.balance != 'aux_loss'

  @property
  def lb_loss_scale(self) -> float:
    """The load-balancing loss weight the loss uses: 0 with balance=bias (the bias balances alone; the loss is
    still computed and reported)."""
    return 0.0 if self.balance == 'bias' else self.lb_loss_weight

  @property
  def dropless(self) -> bool:
    """No capacity limit (capacity_factor None): every expert has room for every token of its group."""
    return self.capacity_factor is None

  def capacity(self, group_size: int) -> int:
    """Slots per expert per group: C = ceil(capacity_factor * S * k / E), at most S; S when dropless."""
    if self.dropless:
      return group_size
    return min(group_size, max(1, math.ceil(self.capacity_factor * group_size * self.top_k / self.n_experts)))



# TrainConfig fields that may differ when resuming a run (duration and bookkeeping, not the experiment).
RESUMABLE_FIELDS = ('steps', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'log_every')


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigDict):
  """One training run: optimisation, data, evaluation and checkpoint cadence. `batch_size` is global."""

  steps: int = option(1000, 'Optimizer steps (or give --tokens).')
  batch_size: int = option(32, 'Sequences per step (global, over all processes).')
  seq_len: int = option(256, 'Training / counting sequence length.')
  lr: float = option(3e-3, 'Peak learning rate (AdamW), reached after warmup, then decayed to lr * min_lr_ratio '
                     '(see --schedule).')
  warmup: int = option(100, 'Linear warmup steps (flags: steps // 10 when the default would not fit).')
  min_lr_ratio: float = option(0.1, 'Final learning rate as a fraction of lr.')
  schedule: str = option('cosine', 'cosine: warmup then cosine decay over all --steps (a larger --steps re-stretches '
                         'it). wsd: warmup-stable-decay (Hagele et al. 2024): the peak lr held, then a 1-sqrt '
                         'cooldown over the last --cooldown_fraction of the steps; with --branches one run yields '
                         'several token counts.', choices=SCHEDULES)
  cooldown_fraction: float = option(0.2, 'wsd: the fraction of a run (or branch) spent cooling down.')
  branches: str = option('', 'wsd: extra cooldown branches forked from the stable trunk, as fractions of --steps '
                         '(e.g. 0.25,0.5); each yields its own (N, D) point. The full --steps is always one.')
  weight_decay: float = option(0.1, 'Decoupled weight decay on matrices (not norm gains or biases).')
  b1: float = option(0.9, 'AdamW first-moment decay.')
  b2: float = option(0.95, 'AdamW second-moment decay.')
  grad_clip: float = option(1.0, 'Clip the global gradient norm to this; 0 = no clipping.')
  data: str = option('stdlib', 'stdlib | stdlib-full | tinystories | tinystories-valid | a path, directory or glob '
                     'of text files or of .npy/.bin token files (see slmjax.data).')
  tokenizer: str = option('', 'A Hugging Face tokenizer.json to tokenize text --data with (pip install tokenizers); '
                         'empty = bytes. train.py --init_from sets it from the imported model.')
  eval_fraction: float = option(0.05, 'Fraction of documents held out for evaluation.')
  seed: int = option(0, 'Seed of the initialisation and the data order.')
  eval_every: int = option(100, 'Held-out evaluation every n steps (0 = at the end only).')
  eval_batches: int = option(8, 'Batches in the (fixed) held-out evaluation.')
  checkpoint_every: int = option(500, 'Checkpoint every n steps (0 = at the end only).')
  keep_checkpoints: int = option(2, 'Checkpoints kept on disk.')
  log_every: int = option(10, 'Write a metrics line every n steps.')

  def __post_init__(self):
    check_integers(self, minimum=1, names=('steps', 'batch_size', 'seq_len', 'eval_batches', 'log_every',
                                           'keep_checkpoints'))
    check_integers(self, minimum=0, names=('warmup', 'eval_every', 'checkpoint_every', 'seed'))
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
    check_choices(self)
    if not 0 < self.cooldown_fraction < 1:
      raise ValueError(f'cooldown_fraction must be in (0, 1), got {self.cooldown_fraction}')
    if self.branches and self.schedule != 'wsd':
      raise ValueError(f'branches={self.branches!r} needs schedule=wsd (cooldown branches fork from its stable '
                       'trunk)')
    if self.schedule == 'wsd':
      for steps in self.branch_steps:
        if self.warmup > steps - self.decay_steps(steps):
          raise ValueError(f'warmup={self.warmup} does not fit the wsd run of {steps} steps (its cooldown starts at '
                           f'step {steps - self.decay_steps(steps)}); lower --warmup or raise the branches')

  def decay_steps(self, steps: int | None = None) -> int:
    """wsd: steps of the cooldown that ends a run (or branch) of `steps` (default: this run's), at least 1."""
    steps = self.steps if steps is None else steps
    return max(1, round(self.cooldown_fraction * steps))

  @property
  def branch_steps(self) -> tuple[int, ...]:
    """wsd: the lengths of the cooldown branches, ascending and ending with `steps` itself."""
    return branch_steps(self.branches, self.steps)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


def branch_steps(branches: str, steps: int) -> tuple[int, ...]:
  """The run lengths `branches` (fractions of `steps`, comma-separated) names, with `steps` itself: distinct,
  ascending; ValueError (one line) on a fraction outside (0, 1] or one that rounds to no step."""
  lengths = {steps}
  for item in filter(None, (part.strip() for part in branches.split(','))):
    try:
      fraction = float(item)
    except ValueError:
      raise ValueError(f'branches={branches!r}: {item!r} is not a number; give fractions of --steps like '
                       '0.25,0.5') from None
    if not 0 < fraction <= 1:
      raise ValueError(f'branches={branches!r}: {item!r} must be a fraction of the run in (0, 1], like 0.25,0.5')
    if round(fraction * steps) < 1:
      raise ValueError(f'branches={branches!r}: {item!r} of a {steps}-step run is no step at all; raise the '
                       'fraction or the token budget')
    lengths.add(round(fraction * steps))
  return tuple(sorted(lengths))


@dataclasses.dataclass(frozen=True)
class SamplingConfig(ConfigDict):
  """How `slmjax.generate` picks each new token from the model's logits."""

  max_new_tokens: int = option(200, 'Tokens to generate after the prompt.')
  temperature: float = option(0.8, 'Divide the logits by this before sampling; 0 = greedy (always the most likely '
                              'token).')
  top_k_tokens: int = option(0, 'Sample only among the k most likely tokens (top-k sampling); 0 = all.')
  top_p: float = option(1.0, 'Sample only among the most likely tokens whose probabilities add up to top_p '
                        '(nucleus sampling); 1 = all.')
  sample_seed: int = option(0, 'Seed of the sampling: the same seed, prompt and model give the same tokens.')

  def __post_init__(self):
    check_integers(self, minimum=1, names=('max_new_tokens',))
    check_integers(self, minimum=0, names=('top_k_tokens', 'sample_seed'))
    if not self.temperature >= 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')


def default_warmup(steps: int, warmup: int = TrainConfig.warmup) -> int:
  """The warmup a run of `steps` gets when none is asked for: the default, or steps // 10 where it would not fit
  (a short run must not fail on a default it never chose)."""
  return warmup if warmup < steps else steps // 10


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature for a context `factor` times longer (Peng et al. 2023, eq. 22; transformers'
  get_mscale): 0.1 * mscale * ln(factor) + 1, and 1 when nothing is extended."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def check_integers(cfg, minimum: int, names: tuple[str, ...], or_none: bool = False) -> None:
  """ValueError unless each field in `names` is an integer >= `minimum` (or None, with `or_none`: derived)."""
  kind = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
  for name in names:
    value = getattr(cfg, name)
    if (value is not None or not or_none) and (not isinstance(value, int) or value < minimum):
      raise ValueError(f'{name} must be {kind}{" or None (derive it)" if or_none else ""}, got {value!r}')


def check_choices(cfg) -> None:
  """ValueError unless every field with `choices` metadata holds one of them."""
  for f in dataclasses.fields(cfg):
    choices, value = f.metadata.get('choices'), getattr(cfg, f.name)
    if choices and value not in choices:
      raise ValueError(f'{f.name}={value!r} is not one of {", ".join(choices)}')
