"""Parameter, FLOP and memory accounting, analytic (from the config) and structural (from the module tree).

Conventions
- total: every parameter (all experts). active: what one token touches: embeddings, attention, norms, router,
  shared experts, dense FFNs and top_k of the routed experts (expert weights scaled by top_k / n_experts).
- embedding parameters: the input embedding table, plus the output projection when it is untied and its bias
  (`lm_head_bias`); everything else is non-embedding (Kaplan et al. 2020 exclude embeddings from N).
- stored weights that gradients do not train (the router's selection bias of DeepSeek-V3) are counted,
  in total and active, as the published checkpoints count them (HF's `e_score_correction_bias`): they must be
  resident, and every token reads them.
- training FLOPs per token (same as PaLM, Chowdhery et al. 2022, appendix B, and Kaplan et al. 2020, table 1):
    6 * N_matmul_active + 6 * n_layers * seq_len * n_heads * head_dim
  N_matmul_active counts parameters used in a matmul by one token: attention projections (MLA latents
  included), dense FFNs, router, shared experts (and their gate), top_k routed experts and the lm_head (tied or
  not: the unembedding matmul happens either way); not the input embedding (a gather), norm gains nor additive
  biases. 6 = 2 FLOPs per multiply-add x 3 (forward + backward). The attention term is causal: QK^T and AV cost
  2 * T * N * (H_qk + H_v) per token per layer forward (4 * T * N * H when both widths are H), halved for the
  lower triangle, x 3 for training. A sliding-window layer (window W < T) attends to W - W^2 / (2T) keys per
  query on average instead of T / 2. Elementwise ops, softmax, the loss and the optimizer are not counted.
  Inference FLOPs per token are a third of training FLOPs (forward only).
- device fit: the smallest rung of DEVICE_LADDER whose memory holds the weights alone in FIT_FRACTION of it
  (the rest left for activations, KV cache and the runtime); int8 / int4 are 1 / 0.5 byte a weight, without
  quantisation scales.
- every parameter says what it is in its `role` metadata (set by `slmjax.layers.make_param`); ROLES maps a role to
  its component of `breakdown` and how it counts, so the counts never depend on attribute names.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from flax import nnx

from slmjax import sharding
from slmjax.config import ModelConfig
from slmjax.layers import is_gated
from slmjax.model import abstract_model
from slmjax.moe import SelectionBias

BYTES_PER_PARAM = {'float32': 4.0, 'bfloat16': 2.0, 'int8': 1.0, 'int4': 0.5}
CACHE_BYTES = {'float32': 4.0, 'bfloat16': 2.0, 'float16': 2.0, 'int8': 1.0}  # per cached number
COMPONENTS = ('embedding', 'attention', 'norms', 'dense_ffn', 'routed_experts', 'shared_experts', 'router')
# role -> (component, kind). Kinds: 'embedding' (outside non_embedding), 'lm_head' (embedding, and the weights of
# the unembedding matmul), 'norm' and 'bias' (non-embedding, not matmul), 'matmul' (non-embedding, every token
# uses it), 'routed' (a matmul of which one token uses top_k / n_experts).
ROLES: dict[str, tuple[str, str]] = {
    'embedding': ('embedding', 'embedding'),  # the input embedding table, untied
    'tied_embedding': ('embedding', 'lm_head'),  # the input embedding table, also the unembedding matrix
    'lm_head': ('embedding', 'lm_head'),  # the untied output projection
    'lm_head_bias': ('embedding', 'embedding'),
    'attention': ('attention', 'matmul'),  # q/k/v/o projections, MLA latent projections
    'attention_bias': ('attention', 'bias'),
    'attention_norm': ('attention', 'norm'),  # QK-norms, MLA latent norms
    'norm': ('norms', 'norm'),  # a block's norms and the final norm
    'dense_ffn': ('dense_ffn', 'matmul'),
    'routed_expert': ('routed_experts', 'routed'),
    'shared_expert': ('shared_experts', 'matmul'),  # shared experts and their gate
    'router': ('router', 'matmul'),
    'selection_bias': ('router', 'bias'),  # stored, not trained (see the conventions above)
}
DEVICE_LADDER = (('phone', 4e9), ('laptop', 16e9), ('gpu-80GB', 80e9), ('node-8x80GB', 640e9))
FIT_FRACTION = 0.8
KV_FIT_DTYPE = 'bfloat16'  # the cache a deployment keeps, whatever the weights' dtype
FIT_DTYPES = ('int4', 'int8', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  embedding: int
  non_embedding: int
  active_non_embedding: int
  norm: int  # norm gains and biases (inside non_embedding; not matmul parameters)
  lm_head_matmul: int  # parameters of the unembedding matmul (= the embedding table when tied)
  bias: int = 0  # additive biases inside non_embedding (q/k/v/o biases, router selection bias): not matmul

  @property
  def total(self) -> int:
    return self.embedding + self.non_embedding

  @property
  def active(self) -> int:
    return self.embedding + self.active_non_embedding

  @property
  def active_matmul(self) -> int:
    return self.active_non_embedding - self.norm - self.bias + self.lm_head_matmul


def _ffn_params(cfg: ModelConfig, width: int) -> int:
  return (3 if is_gated(cfg.activation) else 2) * cfg.d_model * width


def _attention_params(cfg: ModelConfig) -> tuple[int, int, int]:
  """(matmul, norm, bias) parameters of one attention sublayer."""
  D, N = cfg.d_model, cfg.n_heads
  norm_per = 2 if cfg.norm == 'layernorm' else 1
  o_bias = D if cfg.o_bias else 0
  if cfg.attention == 'mla':
    H, R, U, L, C = cfg.head_size, cfg.rope_size, cfg.v_head_size, cfg.q_lora_rank, cfg.kv_rank
    query = D * L + L * N * (H + R) if L else D * N * (H + R)
    matmul = query + D * (C + R) + C * N * (H + U) + N * U * D
    return matmul, (L + C) * norm_per, o_bias
  K, H = cfg.kv_heads, cfg.head_size
  matmul = 2 * D * N * H + 2 * D * K * H
  qk_norm = {'none': 0, 'head': 2 * H, 'full': (N + K) * H}[cfg.qk_norm] * norm_per
  qkv_bias = (N + 2 * K) * H if cfg.qkv_bias else 0
  return matmul, qk_norm, qkv_bias + o_bias


def _moe_params(cfg: ModelConfig) -> tuple[int, int, int]:
  """(total, active, bias) parameters of one MoE FFN: routed experts, router, shared experts and their gate."""
  D, E = cfg.d_model, cfg.n_experts
  routed = E * _ffn_params(cfg, cfg.expert_size)
  always = D * E + _ffn_params(cfg, cfg.n_shared_experts * cfg.shared_size) + (D if cfg.shared_gate else 0)
  bias = E if cfg.router_bias else 0
  return routed + always + bias, routed * cfg.top_k // E + always + bias, bias


def analytic_counts(cfg: ModelConfig) -> ParamCounts:
  """Parameter counts from the config alone (closed form)."""
  D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
  norm_per = 2 if cfg.norm == 'layernorm' else 1
  attn_matmul, attn_norm, attn_bias = _attention_params(cfg)
  block_norms = (4 if cfg.post_norms else 2) * D * norm_per
  norms = L * (block_norms + attn_norm) + D * norm_per
  biases = L * attn_bias
  total = active = L * (attn_matmul + attn_bias) + norms
  for layer in range(L):
    if cfg.is_moe_layer(layer):
      moe_total, moe_active, moe_bias = _moe_params(cfg)
      total, active, biases = total + moe_total, active + moe_active, biases + moe_bias
    else:
      total += _ffn_params(cfg, cfg.ffn_size)
      active += _ffn_params(cfg, cfg.ffn_size)
  embedding = V * D * (1 if cfg.tie_embeddings else 2) + (V if cfg.lm_head_bias else 0)
  return ParamCounts(embedding, total, active, norms, V * D, biases)


class Weight(NamedTuple):
  path: tuple[str, ...]
  shape: tuple[int, ...]
  role: str

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


def stored_weights(model) -> list[Weight]:
  """Every stored weight of a model (its nnx.Params and router selection biases), with its role from metadata."""
  weights = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, SelectionBias))):
    path, role = tuple(str(p) for p in path), var.get_metadata().get('role')
    if role not in ROLES:
      raise ValueError(f'{"/".join(path)}: role {role!r} is not one of counting.ROLES: {", ".join(ROLES)}')
    weights.append(Weight(path, tuple(var.shape), role))
  return weights


def _active(cfg: ModelConfig, kind: str, size: int) -> int:
  return size * cfg.top_k // cfg.n_experts if kind == 'routed' else size


def module_counts(cfg: ModelConfig) -> ParamCounts:
  """Parameter counts read off the real module tree built with `nnx.eval_shape` (nothing allocated), each weight
  counted by its role (ROLES)."""
  embedding = non_embedding = active = norms = biases = lm_head = 0
  for weight in stored_weights(abstract_model(cfg)):
    _, kind = ROLES[weight.role]
    if kind in ('embedding', 'lm_head'):
      embedding += weight.size
      lm_head += weight.size if kind == 'lm_head' else 0
      continue
    non_embedding += weight.size
    active += _active(cfg, kind, weight.size)
    norms += weight.size if kind == 'norm' else 0
    biases += weight.size if kind == 'bias' else 0
  return ParamCounts(embedding, non_embedding, active, norms, lm_head, biases)


def checked_counts(cfg: ModelConfig) -> ParamCounts:
  """`module_counts`, after checking that they equal the closed form (a mismatch is a bug: RuntimeError)."""
  counts, analytic = module_counts(cfg), analytic_counts(cfg)
  if counts != analytic:
    raise RuntimeError(f'module tree {counts} disagrees with analytic {analytic}')
  return counts


def breakdown(cfg: ModelConfig) -> dict[str, dict[str, int]]:
  """Total and active parameters of each of COMPONENTS, read off the module tree (where the parameters are).

  Attention includes its biases and its QK / latent norms; the router its selection bias; the shared experts
  their gate."""
  parts = {component: {'total': 0, 'active': 0} for component in COMPONENTS}
  for weight in stored_weights(abstract_model(cfg)):
    component, kind = ROLES[weight.role]
    parts[component]['total'] += weight.size
    parts[component]['active'] += _active(cfg, kind, weight.size)
  return parts


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, counts: ParamCounts | None = None) -> int:
  """6 * N_matmul_active + 3 * n_layers * seq_len * n_heads * (H_qk + H_v) (see the module docstring); local
  layers count their window's keys."""
  counts = counts or analytic_counts(cfg)
  T = seq_len or cfg.max_seq_len
  keys2 = sum(2 * W - W * W / T if 0 < W < T else T for W in map(cfg.window, range(cfg.n_layers)))  # 2x mean keys
  return 6 * counts.active_matmul + round(3 * keys2 * cfg.n_heads * (cfg.qk_head_size + cfg.v_head_size))


def kv_cache_values_per_token(cfg: ModelConfig) -> int:
  """Numbers one token adds to the inference cache over all layers: keys and values, 2 * K * Z, a GQA layer (MHA:
  K = H); the latent and the shared rotary key, J + R, an MLA layer (DeepSeek caches only those)."""
  per_layer = cfg.kv_rank + cfg.rope_size if cfg.attention == 'mla' else 2 * cfg.kv_heads * cfg.head_size
  return cfg.n_layers * per_layer


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
  """Bytes one token adds to the inference cache, in `dtype` (default: the compute dtype, what
  `slmjax.generate` stores)."""
  return int(kv_cache_values_per_token(cfg) * CACHE_BYTES[dtype or cfg.dtype])


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str | None = None) -> int:
  """Bytes of the inference cache of `batch` sequences of `context` tokens."""
  return kv_cache_bytes_per_token(cfg, dtype) * context * batch


def weight_bytes(n_params: int) -> dict[str, int]:
  return {dtype: int(n_params * b) for dtype, b in BYTES_PER_PARAM.items()}


def smallest_device(n_bytes: float) -> str:
  """The first rung of DEVICE_LADDER whose memory, times FIT_FRACTION, holds `n_bytes`; 'beyond' if none."""
  for name, capacity in DEVICE_LADDER:
    if n_bytes <= FIT_FRACTION * capacity:
      return name
  return 'beyond'


def summary(cfg: ModelConfig, seq_len: int | None = None, counts: ParamCounts | None = None) -> dict:
  """Every count as a flat dict (the JSON of `experiments/count.py`)."""
  counts = counts or analytic_counts(cfg)
  train = train_flops_per_token(cfg, seq_len, counts)
  n_bytes = weight_bytes(counts.total)
  return {
      'total_params': counts.total,
      'active_params': counts.active,
      'embedding_params': counts.embedding,
      'total_non_embedding_params': counts.non_embedding,
      'active_non_embedding_params': counts.active_non_embedding,
      'active_matmul_params': counts.active_matmul,
      'active_fraction': counts.active / counts.total,
      'train_flops_per_token': train,
      'inference_flops_per_token': train // 3,
      'seq_len': seq_len or cfg.max_seq_len,
      'weight_bytes': n_bytes,
      'smallest_device': {dtype: smallest_device(n_bytes[dtype]) for dtype in FIT_DTYPES},
  }


def attention_kind(cfg: ModelConfig) -> str:
  """mla, mha (a key/value head per query head), mqa (one) or gqa (groups): what sets the KV cache's size."""
  if cfg.attention == 'mla':
    return 'mla'
  return 'mha' if cfg.kv_heads == cfg.n_heads else 'mqa' if cfg.kv_heads == 1 else 'gqa'


def kv_fit(cfg: ModelConfig, n_weight_bytes: dict[str, int], context: int, batch: int = 1,
           dtype: str = KV_FIT_DTYPE) -> dict:
  """The KV cache of `batch` sequences of `context` tokens (in `dtype`) and the smallest device that holds the
  weights (in each fit dtype) plus that cache."""
  kv = kv_cache_bytes(cfg, context, batch, dtype)
  return {'attention_kind': attention_kind(cfg), 'kv_cache_dtype': dtype,
          'kv_cache_bytes_per_token': kv_cache_bytes_per_token(cfg, dtype), 'kv_cache_context': context,
          'kv_cache_batch': batch, 'kv_cache_bytes': kv,
          'smallest_device_with_kv': {d: smallest_device(n_weight_bytes[d] + kv) for d in FIT_DTYPES}}


def describe(cfg: ModelConfig, seq_len: int | None = None, preset: str | None = None,
             mesh_sizes: dict[str, int] | None = None, context: int | None = None, batch: int = 1) -> dict:
  """Everything `experiments/count.py` prints about a model: `summary` of the checked counts, `breakdown`, the
  KV cache at `context` (default: seq_len) x `batch` with the device fit including it (`kv_fit`), the config and
  preset name and, on a mesh of `mesh_sizes` (`sharding.hypothetical_mesh`), the weight bytes one device holds in
  each dtype."""
  row = summary(cfg, seq_len, checked_counts(cfg))
  row = {**row, **kv_fit(cfg, row['weight_bytes'], context or row['seq_len'], batch), 'breakdown': breakdown(cfg),
         'config': cfg.to_dict(), 'preset': preset}
  if mesh_sizes:
    row['mesh'] = mesh_sizes
    row['weight_bytes_per_device'] = {dtype: int(sharding.bytes_per_device(cfg, mesh_sizes, b))
                                      for dtype, b in BYTES_PER_PARAM.items()}
  return row
