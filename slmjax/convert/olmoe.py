"""OLMoE: the Llama layout with a routed FFN in every layer (softmax, top-k, renormalised only with
norm_topk_prob) and QK-norm over the whole q / k projection width (qk_norm='full', gains [H * Z] and [K * Z]).
Tensor names are Qwen-MoE's (slmjax/convert/qwen_moe.py) without a shared expert. Converted models are dropless.

Shape letters: slmjax/shapes.py (here D, E).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, llama, mixtral
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('olmoe',)


def config_from_hf(hf: dict) -> ModelConfig:
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for olmoe (silu only)')
  if hf.get('clip_qkv') is not None:
    raise ValueError(f'clip_qkv={hf["clip_qkv"]} is not implemented (set it to null)')
  bias = bool(hf.get('attention_bias', False))
  n_experts = hf['num_experts'] if 'num_experts' in hf else hf['num_local_experts']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=hf['num_attention_heads'], n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      d_ff=hf['intermediate_size'], norm_eps=hf.get('rms_norm_eps', 1e-5),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), max_seq_len=hf.get('max_position_embeddings', 4096),
      qkv_bias=bias, o_bias=bias, qk_norm='full', n_experts=n_experts, top_k=hf['num_experts_per_tok'],
      router='softmax_topk', router_renormalize=bool(hf.get('norm_topk_prob', False)), **mixtral.DROPLESS,
      **common.rope_from_hf(hf))


def model_type_of(cfg: ModelConfig) -> str | None:
  """'olmoe' for a GQA MoE with full-width QK-norm, every layer routed, no shared experts."""
  if (cfg.is_moe and cfg.attention == 'gqa' and cfg.qk_norm == 'full' and not cfg.n_shared_experts
      and cfg.first_dense == 0 and cfg.moe_every == 1 and cfg.router == 'softmax_topk'):
    return 'olmoe'
  return None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  if model_type_of(cfg) != 'olmoe':
    raise ValueError('olmoe checkpoints need a GQA MoE with qk_norm=full, every layer routed, no shared experts '
                     'and router=softmax_topk')
  common.require(cfg, 'olmoe', activation='swiglu', norm='rmsnorm', post_norms=False, embed_scale=False,
                 logit_softcap=0.0, attn_softcap=0.0, norm_plus_one=False, query_pre_attn_scalar=0.0,
                 lm_head_bias=False, router_bias=False, routed_scale=1.0, sliding_window=0, rope_mscale_all_dim=0.0,
                 head_dim=None)
  if cfg.qkv_bias != cfg.o_bias:
    raise ValueError('olmoe checkpoints have biases on all of q, k, v, o or on none (attention_bias)')
  return {'model_type': 'olmoe', 'architectures': ['OlmoeForCausalLM'], 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.d_model, 'intermediate_size': cfg.expert_size, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'hidden_act': 'silu',
          'rms_norm_eps': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
          'max_position_embeddings': cfg.max_seq_len, 'attention_bias': cfg.qkv_bias, 'clip_qkv': None,
          'num_experts': cfg.n_experts, 'num_experts_per_tok': cfg.top_k,
          'norm_topk_prob': cfg.router_renormalize, 'dtype': cfg.param_dtype, **common.rope_to_hf(cfg)}


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, E = cfg.d_model, cfg.n_experts
  out = mixtral.embedding_rules(cfg)
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += [plain(hf + 'input_layernorm.weight', us + 'attn_norm.scale', (D,)),
            plain(hf + 'post_attention_layernorm.weight', us + 'ffn_norm.scale', (D,))]
    out += llama.attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    out.append(linear(hf + 'mlp.gate.weight', us + 'ffn.w_router_DE', (D,), (E,)))
    out += mixtral.expert_rules(cfg, hf + 'mlp.', us + 'ffn.')
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
