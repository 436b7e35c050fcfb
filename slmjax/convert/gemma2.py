"""Gemma 2: the Llama layout plus four norms a block, (1 + w) norm gains, sqrt(d_model)-scaled embeddings,
GeGLU (tanh GELU), attention and final logit soft-capping, query_pre_attn_scalar and sliding-window attention
on even layers. Its norm names differ from Llama's:

  model.layers.{i}.input_layernorm           -> attention pre-norm    post_attention_layernorm  -> its post-norm
  model.layers.{i}.pre_feedforward_layernorm -> FFN pre-norm          post_feedforward_layernorm -> its post-norm

Shape letters: slmjax/shapes.py (here D, F, V).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, llama
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('gemma2',)


def config_from_hf(hf: dict) -> ModelConfig:
  act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
  if act != 'gelu_pytorch_tanh':
    raise ValueError(f'hidden_activation={act!r} is not implemented for gemma2 (gelu_pytorch_tanh only)')
  if hf.get('use_bidirectional_attention'):
    raise ValueError('use_bidirectional_attention=true is not implemented (slmjax attention is causal)')
  bias = bool(hf.get('attention_bias', False))
  n_layers = hf['num_hidden_layers']
  if hf.get('layer_types') is None:  # Hub configs before transformers 5: local attention on even layers
    hf = {**hf, 'layer_types': ['sliding_attention' if i % 2 == 0 else 'full_attention' for i in range(n_layers)]}
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=hf['num_attention_heads'], n_kv_heads=hf['num_key_value_heads'], head_dim=hf.get('head_dim', 256),
      d_ff=hf['intermediate_size'], activation='geglu', norm_eps=hf.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)), max_seq_len=hf.get('max_position_embeddings', 8192),
      qkv_bias=bias, o_bias=bias, embed_scale=True, post_norms=True, norm_plus_one=True,
      query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar', 256)),
      attn_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
      logit_softcap=float(hf.get('final_logit_softcapping') or 0.0),
      **common.rope_from_hf(hf), **common.sliding_from_hf(hf, n_layers))


def model_type_of(cfg: ModelConfig) -> str | None:
  """'gemma2' for a model with Gemma's (1 + w) norms, else None."""
  return 'gemma2' if cfg.norm_plus_one and not cfg.is_moe else None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  common.require(cfg, 'gemma2', n_experts=0, attention='gqa', activation='geglu', norm='rmsnorm', post_norms=True,
                 embed_scale=True, norm_plus_one=True, qk_norm='none', lm_head_bias=False, rope_mscale_all_dim=0.0)
  if cfg.qkv_bias != cfg.o_bias:
    raise ValueError('gemma2 checkpoints have biases on all of q, k, v, o or on none (attention_bias)')
  if cfg.sliding_window and cfg.sliding_every != 2:
    raise ValueError(f'gemma2 checkpoints have local attention on even layers: sliding_every=2, not '
                     f'{cfg.sliding_every}')
  return {'model_type': 'gemma2', 'architectures': ['Gemma2ForCausalLM'], 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.d_model, 'intermediate_size': cfg.ffn_size, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_size,
          'hidden_activation': 'gelu_pytorch_tanh', 'rms_norm_eps': cfg.norm_eps,
          'tie_word_embeddings': cfg.tie_embeddings, 'max_position_embeddings': cfg.max_seq_len,
          'attention_bias': cfg.qkv_bias, 'dtype': cfg.param_dtype,
          'query_pre_attn_scalar': integral(cfg.query_pre_attn_scalar or cfg.head_size),
          'attn_logit_softcapping': cfg.attn_softcap or None, 'final_logit_softcapping': cfg.logit_softcap or None,
          **common.rope_to_hf(cfg), **common.sliding_to_hf(cfg)}


def integral(x: float) -> int | float:
  """x as an int when it is one (transformers' Gemma2Config types query_pre_attn_scalar as int)."""
  return int(x) if float(x).is_integer() else x


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, F, V = cfg.d_model, cfg.ffn_size, cfg.vocab_size
  out = [plain('model.embed_tokens.weight', 'embed_VD', (V, D)), plain('model.norm.weight', 'final_norm.scale', (D,))]
  if not cfg.tie_embeddings:
    out.append(linear('lm_head.weight', 'lm_head_DV', (D,), (V,)))
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += [plain(hf + name + '.weight', us + ours + '.scale', (D,)) for name, ours in (
        ('input_layernorm', 'attn_norm'), ('post_attention_layernorm', 'post_attn_norm'),
        ('pre_feedforward_layernorm', 'ffn_norm'), ('post_feedforward_layernorm', 'post_ffn_norm'))]
    out += llama.attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    out += [linear(hf + 'mlp.gate_proj.weight', us + 'ffn.w_gate_DF', (D,), (F,)),
            linear(hf + 'mlp.up_proj.weight', us + 'ffn.w_up_DF', (D,), (F,)),
            linear(hf + 'mlp.down_proj.weight', us + 'ffn.w_down_FD', (F,), (D,))]
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
