"""Frozen model configuration shared by dense and Mixture-of-Experts models.

A dense model is `n_experts == 0`; every other field means the same thing for both, so a dense and an MoE
config that differ only in the MoE fields build models that differ only in their feed-forward blocks.
Validation happens in `__post_init__` and raises `ValueError` with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ACTIVATIONS = ('swiglu', 'geglu', 'gelu')
NORMS = ('rmsnorm', 'layernorm')
ROUTERS = ('softmax_topk', 'topk_softmax', 'sigmoid')
ATTENTIONS = ('gqa', 'mla')
QK_NORMS = ('none', 'head', 'full')
DISPATCHES = ('auto', 'einsum', 'gather', 'ragged', 'dense')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigDict:
  """Serialisation shared by the frozen config dataclasses (config.json of a run, results rows)."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f'unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}')
    return cls(**data)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


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
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int | None = None
  activation: str = 'swiglu'
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  lm_head_bias: bool = False  # a bias on the output projection (Phi-3.5-MoE)
  embed_scale: bool = False  # multiply input embeddings by sqrt(d_model) (Gemma)
  logit_softcap: float = 0.0  # final logits -> cap * tanh(logits / cap) (Gemma 2: 30); 0 = off
  post_norms: bool = False  # also norm each sublayer's output before the residual add: 4 norms a block (Gemma 2)
  max_seq_len: int = 256
  dtype: str = 'float32'  # compute dtype of activations and matmuls
  param_dtype: str = 'float32'  # storage dtype of parameters

  # Attention variants.
  attention: str = 'gqa'  # 'gqa': MHA / GQA / MQA by n_kv_heads; 'mla': Multi-head Latent Attention (DeepSeek V2)
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2, Phi-3.5-MoE)
  o_bias: bool = False  # bias on the output projection (Phi-3.5-MoE)
  qk_norm: str = 'none'  # 'head': one norm over head_dim shared by all heads (Qwen3); 'full': over all heads (OLMoE)
  attn_softcap: float = 0.0  # attention logits -> cap * tanh(logits / cap) (Gemma 2: 50); 0 = off
  q_lora_rank: int = 0  # MLA: rank of the low-rank query path (DeepSeek V3: 1536); 0 = full-rank query
  kv_lora_rank: int | None = None  # MLA: rank of the compressed key/value latent
  qk_rope_dim: int | None = None  # MLA: rotary part of each q/k head (a single rotary key shared by all heads)
  v_head_dim: int | None = None  # MLA: width of each value head

  # Mixture-of-Experts; n_experts == 0 is a dense model and the fields below are ignored.
  n_experts: int = 0
  top_k: int = 2
  d_expert: int | None = None
  n_shared_experts: int = 0
  d_shared: int | None = None
  moe_every: int = 1  # layer i (0-based, after the dense prefix) is MoE when (i - first_dense) % moe_every == 0
  first_dense: int = 0  # the first `first_dense` layers keep a dense FFN (DeepSeek style)
  capacity_factor: float | None = 1.25  # None = dropless: every expert has room for every token of its group
  group_size: int = 512  # tokens per dispatch group (S); keeps the [G,S,E,C] one-hot tensors small
  dispatch: str = 'auto'  # 'auto' = the measured fastest for the capacity rule (see slmjax.dispatch)
  router: str = 'softmax_topk'
  router_renormalize: bool = True  # softmax_topk, sigmoid: rescale the k kept gates to sum to one
  router_bias: bool = False  # sigmoid only: selection-only bias, not trained by gradients (DeepSeek V3)
  routed_scale: float = 1.0  # multiply the routed experts' output (DeepSeek routed_scaling_factor)
  shared_gate: bool = False  # shared experts' output times sigmoid(x . w), w of shape [D] (Qwen MoE)
  lb_loss_weight: float = 0.01
  z_loss_weight: float = 0.001

  def __post_init__(self):
    positive = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'max_seq_len', 'group_size', 'moe_every')
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    for name in ('n_kv_heads', 'head_dim', 'd_ff', 'd_expert', 'd_shared', 'kv_lora_rank', 'qk_rope_dim',
                 'v_head_dim'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f'{name} must be a positive integer or None (derive it), got {value!r}')
    _check_choice('activation', self.activation, ACTIVATIONS)
    _check_choice('norm', self.norm, NORMS)
    _check_choice('router', self.router, ROUTERS)
    _check_choice('dispatch', self.dispatch, DISPATCHES)
    _check_choice('dtype', self.dtype, DTYPES)
    _check_choice('param_dtype', self.param_dtype, DTYPES)
    _check_choice('attention', self.attention, ATTENTIONS)
    _check_choice('qk_norm', self.qk_norm, QK_NORMS)
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
      if self.capacity_factor is not None and self.capacity_factor <= 0:
        raise ValueError(f'capacity_factor must be positive or None (dropless), got {self.capacity_factor}')
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
      if self.router_bias and self.router != 'sigmoid':
        raise ValueError(f'router_bias needs router=sigmoid (DeepSeek V3), got router={self.router}')
      if self.shared_gate and not self.n_shared_experts:
        raise ValueError('shared_gate needs n_shared_experts > 0')
      if self.routed_scale <= 0:
        raise ValueError(f'routed_scale must be positive, got {self.routed_scale}')
    for name in ('lb_loss_weight', 'z_loss_weight'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')

  # Derived sizes.
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

  def capacity(self, group_size: int) -> int:
    """Slots per expert per group: C = ceil(capacity_factor * S * k / E), at most S; S when dropless."""
    if self.capacity_factor is None:
      return group_size
    return min(group_size, max(1, math.ceil(self.capacity_factor * group_size * self.top_k / self.n_experts)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {", ".join(choices)}')
