"""Qwen1.5-MoE / Qwen2-MoE (q, k, v biases; a shared expert scaled by sigmoid(x . w)) and Qwen3-MoE (per-head
QK-norm, no shared expert). Router: softmax over the experts, top-k, renormalised only with norm_topk_prob.
A layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers; slmjax says the same
with first_dense and moe_every (a pattern it cannot say fails in one line). Converted models are dropless.

  model.layers.{i}.mlp.gate.weight [E, D]                     -> ffn.w_router_DE
  model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight -> ffn.w_{gate,up,down}_E..
  model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight [1, D]  (Qwen2)
  model.layers.{i}.mlp.{gate,up,down}_proj.weight             (dense layers, width intermediate_size)

Shape letters: slmjax/shapes.py (here D, E, F).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, llama, mixtral
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('qwen2_moe', 'qwen3_moe')
ARCHITECTURES = {'qwen2_moe': 'Qwen2MoeForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}


def moe_layout(moe_layers: list[bool]) -> dict:
  """first_dense and moe_every that make exactly `moe_layers` MoE; ValueError when no pair does."""
  n = len(moe_layers)
  for first in range(n):
    for every in range(1, n + 1):
      if moe_layers == [i >= first and (i - first) % every == 0 for i in range(n)]:
        return {'first_dense': first, 'moe_every': every}
  raise ValueError(f'MoE layers {[i for i, m in enumerate(moe_layers) if m]} are not a pattern slmjax expresses '
                   '(a dense prefix, then every moe_every-th layer)')


def config_from_hf(hf: dict) -> ModelConfig:
  kind = hf['model_type']
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for {kind} (silu only)')
  if hf.get('use_sliding_window'):
    raise ValueError(f'use_sliding_window=true is not implemented for {kind}')
  n_layers, step = hf['num_hidden_layers'], hf.get('decoder_sparse_step', 1)
  n_experts = hf['num_experts'] if 'num_experts' in hf else hf['num_local_experts']  # transformers 5 writes the latter
  only = set(hf.get('mlp_only_layers') or [])
  moe = [i not in only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
  shared = kind == 'qwen2_moe' and hf.get('shared_expert_intermediate_size', 0) > 0
  bias = bool(hf.get('qkv_bias', True)) if kind == 'qwen2_moe' else bool(hf.get('attention_bias', False))
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=hf['num_attention_heads'], n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'], d_ff=hf['intermediate_size'],
      norm_eps=hf.get('rms_norm_eps', 1e-6), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      max_seq_len=hf.get('max_position_embeddings', 32768), qkv_bias=bias, o_bias=bias and kind == 'qwen3_moe',
      qk_norm='head' if kind == 'qwen3_moe' else 'none', n_experts=n_experts,
      top_k=hf['num_experts_per_tok'], d_expert=hf['moe_intermediate_size'], router='softmax_topk',
      router_renormalize=bool(hf.get('norm_topk_prob', False)), n_shared_experts=int(shared),
      d_shared=hf['shared_expert_intermediate_size'] if shared else None, shared_gate=shared,
      **moe_layout(moe), **mixtral.DROPLESS, **common.rope_from_hf(hf))


def model_type_of(cfg: ModelConfig) -> str | None:
  """qwen3_moe for a GQA MoE with per-head QK-norm and no shared expert; qwen2_moe for one gated shared expert."""
  if not cfg.is_moe or cfg.attention != 'gqa' or cfg.router != 'softmax_topk' or cfg.norm != 'rmsnorm':
    return None
  if cfg.qk_norm == 'head' and not cfg.n_shared_experts:
    return 'qwen3_moe'
  if cfg.qk_norm == 'none' and cfg.n_shared_experts == 1 and cfg.shared_gate and not cfg.o_bias:
    return 'qwen2_moe'
  return None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  kind = model_type or model_type_of(cfg)
  if kind not in MODEL_TYPES or model_type_of(cfg) != kind:
    raise ValueError(f'{kind} checkpoints cannot express this model (qwen3_moe: per-head QK-norm, no shared '
                     'expert; qwen2_moe: one shared expert with shared_gate; both router=softmax_topk)')
  common.require(cfg, kind, activation='swiglu', post_norms=False, embed_scale=False, logit_softcap=0.0,
                 attn_softcap=0.0, norm_plus_one=False, query_pre_attn_scalar=0.0, lm_head_bias=False,
                 router_bias=False, routed_scale=1.0, sliding_window=0, rope_mscale_all_dim=0.0)
  if kind == 'qwen3_moe' and cfg.qkv_bias != cfg.o_bias:
    raise ValueError('qwen3_moe checkpoints have biases on all of q, k, v, o or on none (attention_bias)')
  moe = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
  hf = {'model_type': kind, 'architectures': [ARCHITECTURES[kind]], 'vocab_size': cfg.vocab_size,
        'hidden_size': cfg.d_model, 'intermediate_size': cfg.ffn_size, 'num_hidden_layers': cfg.n_layers,
        'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_size,
        'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
        'max_position_embeddings': cfg.max_seq_len, 'num_experts': cfg.n_experts,
        'num_experts_per_tok': cfg.top_k, 'moe_intermediate_size': cfg.expert_size,
        'norm_topk_prob': cfg.router_renormalize, 'decoder_sparse_step': 1,
        'mlp_only_layers': [i for i, m in enumerate(moe) if not m], 'use_sliding_window': False,
        'dtype': cfg.param_dtype, **common.rope_to_hf(cfg)}
  if kind == 'qwen2_moe':
    hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_size)
  else:
    hf['attention_bias'] = cfg.qkv_bias
  return hf


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, E = cfg.d_model, cfg.n_experts
  out = mixtral.embedding_rules(cfg)
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += [plain(hf + 'input_layernorm.weight', us + 'attn_norm.scale', (D,)),
            plain(hf + 'post_attention_layernorm.weight', us + 'ffn_norm.scale', (D,))]
    out += llama.attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    if not cfg.is_moe_layer(i):
      out += mixtral.dense_rules(hf + 'mlp.', us + 'ffn.', D, cfg.ffn_size)
      continue
    out.append(linear(hf + 'mlp.gate.weight', us + 'ffn.w_router_DE', (D,), (E,)))
    out += mixtral.expert_rules(cfg, hf + 'mlp.', us + 'ffn.')
    if cfg.n_shared_experts:
      out += mixtral.dense_rules(hf + 'mlp.shared_expert.', us + 'ffn.shared.', D, cfg.shared_size)
      out.append(plain(hf + 'mlp.shared_expert_gate.weight', us + 'ffn.w_shared_gate_D', (D,), (1, D)))
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
