"""Parameter, FLOP and memory accounting, analytic (from the config) and structural (from the module tree).

Conventions
- total: every parameter (all experts). active: what one token touches: embeddings, attention, norms, router,
  shared experts, dense FFNs and top_k of the routed experts (expert weights scaled by top_k / n_experts).
- embedding parameters: the input embedding table, plus the output projection when it is untied; everything else
  is non-embedding (Kaplan et al. 2020 exclude embeddings from N).
- training FLOPs per token (same as PaLM, Chowdhery et al. 2022, appendix B, and Kaplan et al. 2020, table 1):
    6 * N_matmul_active + 6 * n_layers * seq_len * n_heads * head_dim
  N_matmul_active counts parameters used in a matmul by one token: attention q/k/v/o, dense FFNs, router,
  shared experts, top_k routed experts and the lm_head (tied or not: the unembedding matmul happens either way);
  not the input embedding (a gather) nor norm gains. 6 = 2 FLOPs per multiply-add x 3 (forward + backward).
  The attention term is causal: QK^T and AV cost 4 * T * N * H per token per layer forward, halved for the
  lower triangle, x 3 for training. Elementwise ops, softmax, the loss and the optimizer are not counted.
  Inference FLOPs per token are a third of training FLOPs (forward only).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.layers import is_gated

BYTES_PER_PARAM = {'float32': 4.0, 'bfloat16': 2.0, 'int8': 1.0, 'int4': 0.5}
EMBEDDING_PARAMS = ('embed_VD', 'lm_head_DV')
ROUTED_EXPERT_PARAMS = ('w_gate_EDF', 'w_up_EDF', 'w_down_EFD')
NORM_PARAMS = ('scale_D', 'bias_D')


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  embedding: int
  non_embedding: int
  active_non_embedding: int
  norm: int  # norm gains and biases (inside non_embedding; not matmul parameters)
  lm_head_matmul: int  # parameters of the unembedding matmul (= the embedding table when tied)

  @property
  def total(self) -> int:
    return self.embedding + self.non_embedding

  @property
  def active(self) -> int:
    return self.embedding + self.active_non_embedding

  @property
  def active_matmul(self) -> int:
    return self.active_non_embedding - self.norm + self.lm_head_matmul


def _ffn_params(cfg: ModelConfig, width: int) -> int:
  return (3 if is_gated(cfg.activation) else 2) * cfg.d_model * width


def analytic_counts(cfg: ModelConfig) -> ParamCounts:
  """Parameter counts from the config alone (closed form)."""
  D, V = cfg.d_model, cfg.vocab_size
  norm_per = 2 if cfg.norm == 'layernorm' else 1
  attn = D * cfg.n_heads * cfg.head_size * 2 + D * cfg.kv_heads * cfg.head_size * 2
  norms = (2 * cfg.n_layers + 1) * D * norm_per
  total = active = attn * cfg.n_layers + norms
  for layer in range(cfg.n_layers):
    if cfg.is_moe_layer(layer):
      routed = cfg.n_experts * _ffn_params(cfg, cfg.expert_size)
      always = D * cfg.n_experts + _ffn_params(cfg, cfg.n_shared_experts * cfg.shared_size)
      total += routed + always
      active += routed * cfg.top_k // cfg.n_experts + always
    else:
      total += _ffn_params(cfg, cfg.ffn_size)
      active += _ffn_params(cfg, cfg.ffn_size)
  embedding = V * D * (1 if cfg.tie_embeddings else 2)
  return ParamCounts(embedding, total, active, norms, V * D)


def module_counts(cfg: ModelConfig) -> ParamCounts:
  """Parameter counts read off the real module tree built with `nnx.eval_shape` (nothing allocated)."""
  from slmjax.model import abstract_model  # local: model imports this module's users, keep import light
  model = abstract_model(cfg)
  embedding = non_embedding = active = norms = 0
  lm_head = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, size = str(path[-1]), int(np.prod(var.shape))
    if name in EMBEDDING_PARAMS:
      embedding += size
      lm_head = size if name == 'lm_head_DV' or cfg.tie_embeddings else lm_head
      continue
    non_embedding += size
    if name in ROUTED_EXPERT_PARAMS:
      active += size * cfg.top_k // cfg.n_experts
    else:
      active += size
    if name in NORM_PARAMS:
      norms += size
  return ParamCounts(embedding, non_embedding, active, norms, lm_head)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, counts: ParamCounts | None = None) -> int:
  """6 * N_matmul_active + 6 * n_layers * seq_len * n_heads * head_dim (see the module docstring)."""
  counts = counts or analytic_counts(cfg)
  T = seq_len or cfg.max_seq_len
  return 6 * counts.active_matmul + 6 * cfg.n_layers * T * cfg.n_heads * cfg.head_size


def weight_bytes(n_params: int) -> dict[str, int]:
  return {dtype: int(n_params * b) for dtype, b in BYTES_PER_PARAM.items()}


def summary(cfg: ModelConfig, seq_len: int | None = None, counts: ParamCounts | None = None) -> dict:
  """Every count as a flat dict (the JSON of `experiments/count.py`)."""
  counts = counts or analytic_counts(cfg)
  train = train_flops_per_token(cfg, seq_len, counts)
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
      'weight_bytes': weight_bytes(counts.total),
  }


def tree_size(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
