"""Phi-3.5-MoE (`phimoe`): the Mixtral layout with LayerNorms (gain and bias), biases on q, k, v, o
(attention_bias) and on the lm_head (lm_head_bias), and sparsemixer top-2 routing (`router='sparsemixer'`, its
eps = router_jitter_noise): the deterministic path transformers runs at inference. The published checkpoint's
long-context rotary scaling is longrope with short_mscale = long_mscale (slmjax's rope_attention_factor). slmjax
picks the long factors beyond original_max_position_embeddings, as Microsoft's reference code and transformers'
Phi-3 do; transformers 5's PhiMoE keeps the short ones at every length (only its mscale switches), so the two
agree up to that length.

  model.layers.{i}.{input,post_attention}_layernorm.{weight,bias}, model.norm.{weight,bias}, lm_head.bias [V]
  model.layers.{i}.block_sparse_moe.gate.weight, block_sparse_moe.experts.{e}.{w1,w3,w2}.weight (as Mixtral)

Shape letters: slmjax/shapes.py (here D, E, V).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, llama, mixtral
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('phimoe',)


def config_from_hf(hf: dict) -> ModelConfig:
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for phimoe (silu only)')
  if hf['num_experts_per_tok'] != 2:
    raise ValueError(f'phimoe num_experts_per_tok={hf["num_experts_per_tok"]}: sparsemixer routes top-2 only')
  bias, n_layers = bool(hf.get('attention_bias', False)), hf['num_hidden_layers']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=hf['num_attention_heads'], n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'], d_ff=hf['intermediate_size'],
      norm='layernorm', norm_eps=hf.get('rms_norm_eps', 1e-5),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), max_seq_len=hf.get('max_position_embeddings', 4096),
      qkv_bias=bias, o_bias=bias, lm_head_bias=bool(hf.get('lm_head_bias', False)),
      n_experts=hf['num_local_experts'], top_k=2, router='sparsemixer',
      sparsemixer_eps=float(hf.get('router_jitter_noise', 0.01)), **mixtral.DROPLESS,
      **common.rope_from_hf(hf, phi_mscales=True), **common.sliding_from_hf(hf, n_layers))


def model_type_of(cfg: ModelConfig) -> str | None:
  return 'phimoe' if cfg.is_moe and cfg.router == 'sparsemixer' and cfg.attention == 'gqa' else None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  common.require(cfg, 'phimoe', attention='gqa', activation='swiglu', norm='layernorm', qk_norm='none',
                 post_norms=False, embed_scale=False, logit_softcap=0.0, attn_softcap=0.0, norm_plus_one=False,
                 query_pre_attn_scalar=0.0, n_shared_experts=0, first_dense=0, moe_every=1, router='sparsemixer',
                 routed_scale=1.0, rope_mscale_all_dim=0.0, qkv_bias=cfg.o_bias)
  if cfg.sliding_window and cfg.sliding_every != 1:
    raise ValueError(f'phimoe checkpoints cannot express sliding_every={cfg.sliding_every}')
  rope = common.rope_to_hf(cfg)
  if cfg.rope_scaling == 'longrope':  # PhimoeConfig requires both; its rotary embedding multiplies by them
    rope['rope_parameters'].update(short_mscale=cfg.rope_attention_factor, long_mscale=cfg.rope_attention_factor)
  return {'model_type': 'phimoe', 'architectures': ['PhimoeForCausalLM'], 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.d_model, 'intermediate_size': cfg.expert_size, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_size,
          'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
          'max_position_embeddings': cfg.max_seq_len, 'num_local_experts': cfg.n_experts,
          'num_experts_per_tok': 2, 'attention_bias': cfg.qkv_bias, 'lm_head_bias': cfg.lm_head_bias,
          'router_jitter_noise': cfg.sparsemixer_eps, 'input_jitter_noise': 0.0,
          'sliding_window': cfg.sliding_window or None, 'dtype': cfg.param_dtype, **rope}


def layernorm_rules(hf: str, us: str, D: int) -> list[common.Rule]:
  return [plain(hf + '.weight', us + '.scale', (D,)), plain(hf + '.bias', us + '.bias', (D,))]


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, E, V = cfg.d_model, cfg.n_experts, cfg.vocab_size
  out = [plain('model.embed_tokens.weight', 'embed_VD', (V, D)), *layernorm_rules('model.norm', 'final_norm', D)]
  if not cfg.tie_embeddings:
    out.append(linear('lm_head.weight', 'lm_head_DV', (D,), (V,)))
  if cfg.lm_head_bias:
    out.append(plain('lm_head.bias', 'b_lm_head_V', (V,)))
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += layernorm_rules(hf + 'input_layernorm', us + 'attn_norm', D)
    out += layernorm_rules(hf + 'post_attention_layernorm', us + 'ffn_norm', D)
    out += llama.attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    out.append(linear(hf + 'block_sparse_moe.gate.weight', us + 'ffn.w_router_DE', (D,), (E,)))
    out += mixtral.expert_rules(cfg, hf + 'block_sparse_moe.', us + 'ffn.', ('w1', 'w3', 'w2'))
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
