"""Mixtral: the Llama attention with a routed FFN in every layer (softmax over the experts, top-k,
renormalised), and the per-expert tensor helpers the other MoE families share:

  model.layers.{i}.block_sparse_moe.gate.weight [E, D]                      -> ffn.w_router_DE
  model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight           -> ffn.w_{gate,up,down}_E..

Converted models are dropless (capacity_factor None): transformers never drops a token, so parity needs it.

Shape letters: slmjax/shapes.py (here D, E, F, V).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, llama
from slmjax.convert.common import linear, plain, stacked

MODEL_TYPES = ('mixtral',)


def config_from_hf(hf: dict) -> ModelConfig:
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for mixtral (silu only)')
  n_layers = hf['num_hidden_layers']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=hf['num_attention_heads'], n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'], d_ff=hf['intermediate_size'],
      norm_eps=hf.get('rms_norm_eps', 1e-5), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      max_seq_len=hf.get('max_position_embeddings', 4096), n_experts=hf['num_local_experts'],
      top_k=hf['num_experts_per_tok'], router='softmax_topk', router_renormalize=True, **DROPLESS,
      **common.rope_from_hf(hf), **common.sliding_from_hf(hf, n_layers))


# Transformers routes every token to its experts: the converted model is dropless in training and evaluation.
DROPLESS = {'capacity_factor': None, 'eval_capacity_factor': None}


def model_type_of(cfg: ModelConfig) -> str | None:
  """'mixtral' for a GQA MoE of routed experts only, renormalised softmax router, every layer MoE."""
  if (cfg.is_moe and cfg.attention == 'gqa' and not cfg.n_shared_experts and cfg.first_dense == 0
      and cfg.moe_every == 1 and cfg.router == 'softmax_topk' and cfg.router_renormalize and cfg.qk_norm == 'none'
      and cfg.norm == 'rmsnorm' and not cfg.qkv_bias):
    return 'mixtral'
  return None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  if model_type_of(cfg) != 'mixtral':
    raise ValueError('mixtral checkpoints need a GQA MoE with every layer routed, no shared experts, no qk-norm or '
                     'biases, and router=softmax_topk with router_renormalize')
  common.require(cfg, 'mixtral', activation='swiglu', post_norms=False, embed_scale=False, logit_softcap=0.0,
                 attn_softcap=0.0, norm_plus_one=False, query_pre_attn_scalar=0.0, lm_head_bias=False,
                 o_bias=False, router_bias=False, routed_scale=1.0, rope_mscale_all_dim=0.0)
  if cfg.sliding_window and cfg.sliding_every != 1:
    raise ValueError(f'mixtral checkpoints cannot express sliding_every={cfg.sliding_every}')
  return {'model_type': 'mixtral', 'architectures': ['MixtralForCausalLM'], 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.d_model, 'intermediate_size': cfg.expert_size, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_size,
          'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
          'max_position_embeddings': cfg.max_seq_len, 'num_local_experts': cfg.n_experts,
          'num_experts_per_tok': cfg.top_k, 'sliding_window': cfg.sliding_window or None, 'dtype': cfg.param_dtype,
          **common.rope_to_hf(cfg)}


def expert_rules(cfg: ModelConfig, hf: str, us: str, names: tuple[str, str, str] = ('gate_proj', 'up_proj',
                                                                                    'down_proj')
                 ) -> list[common.Rule]:
  """The routed experts `hf`experts.{e}.{gate, up, down}.weight (names in that order) <-> `us`w_*_E.."""
  D, E, F = cfg.d_model, cfg.n_experts, cfg.expert_size
  gate, up, down = ([f'{hf}experts.{e}.{n}.weight' for e in range(E)] for n in names)
  return [stacked(gate, us + 'w_gate_EDF', (D,), (F,)), stacked(up, us + 'w_up_EDF', (D,), (F,)),
          stacked(down, us + 'w_down_EFD', (F,), (D,))]


def dense_rules(hf: str, us: str, D: int, F: int, names: tuple[str, str, str] = ('gate_proj', 'up_proj',
                                                                                  'down_proj')
                ) -> list[common.Rule]:
  """A SwiGLU FFN `hf`{gate, up, down}.weight <-> `us`w_{gate,up}_DF, w_down_FD (dense layer, shared expert)."""
  gate, up, down = names
  return [linear(f'{hf}{gate}.weight', us + 'w_gate_DF', (D,), (F,)),
          linear(f'{hf}{up}.weight', us + 'w_up_DF', (D,), (F,)),
          linear(f'{hf}{down}.weight', us + 'w_down_FD', (F,), (D,))]


def embedding_rules(cfg: ModelConfig) -> list[common.Rule]:
  """Embedding, final norm and (untied) lm_head, named as every Llama-like family names them."""
  D, V = cfg.d_model, cfg.vocab_size
  out = [plain('model.embed_tokens.weight', 'embed_VD', (V, D)), plain('model.norm.weight', 'final_norm.scale', (D,))]
  if not cfg.tie_embeddings:
    out.append(linear('lm_head.weight', 'lm_head_DV', (D,), (V,)))
  return out


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, E = cfg.d_model, cfg.n_experts
  out = embedding_rules(cfg)
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += [plain(hf + 'input_layernorm.weight', us + 'attn_norm.scale', (D,)),
            plain(hf + 'post_attention_layernorm.weight', us + 'ffn_norm.scale', (D,))]
    out += llama.attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    out.append(linear(hf + 'block_sparse_moe.gate.weight', us + 'ffn.w_router_DE', (D,), (E,)))
    out += expert_rules(cfg, hf + 'block_sparse_moe.', us + 'ffn.', ('w1', 'w3', 'w2'))
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
