"""The Llama family: Llama 2 / 3.x (llama3 rope scaling), SmolLM2, Mistral (sliding window), Qwen2 / 2.5 (q, k,
v biases) and Qwen3 (per-head QK-norm). One layout, a few flags:

  model.embed_tokens.weight [V, D]          model.norm.weight [D]         lm_head.weight [V, D] (untied only)
  model.layers.{i}.input_layernorm.weight [D]          -> attention pre-norm
  model.layers.{i}.post_attention_layernorm.weight [D] -> FFN pre-norm (despite its name)
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias with attention_bias / Qwen2), {q,k}_norm.weight [Z]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight

Shape letters: slmjax/shapes.py (here D, F, H, K, V, Z).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'qwen3': 'Qwen3ForCausalLM'}


def config_from_hf(hf: dict) -> ModelConfig:
  """The ModelConfig of a Llama-family config.json; ValueError for a feature slmjax does not convert."""
  kind = hf['model_type']
  if hf.get('mlp_bias'):
    raise ValueError('mlp_bias=true (biases on the FFN) is not implemented')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for {kind} (silu only)')
  bias = bool(hf.get('attention_bias', False))
  n_layers = hf['num_hidden_layers']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=hf['num_attention_heads'], n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'], d_ff=hf['intermediate_size'],
      norm_eps=hf.get('rms_norm_eps', 1e-6), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      max_seq_len=hf.get('max_position_embeddings', 2048),
      qkv_bias=bias or kind == 'qwen2', o_bias=bias, qk_norm='head' if kind == 'qwen3' else 'none',
      **common.rope_from_hf(hf), **common.sliding_from_hf(hf, n_layers))


def model_type_of(cfg: ModelConfig) -> str | None:
  """The model_type an export of `cfg` declares when none is asked for (None: not a Llama-family model)."""
  if cfg.is_moe or cfg.attention != 'gqa' or cfg.norm_plus_one or cfg.post_norms:
    return None
  if cfg.qk_norm == 'head':
    return 'qwen3'
  if cfg.qkv_bias and not cfg.o_bias:
    return 'qwen2'
  return 'mistral' if cfg.sliding_window else 'llama'


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  """The config.json of `cfg` as `model_type` (default `model_type_of(cfg)`); ValueError if it cannot say it."""
  kind = model_type or model_type_of(cfg) or 'llama'
  common.require(cfg, kind, n_experts=0, attention='gqa', activation='swiglu', norm='rmsnorm', post_norms=False,
                 embed_scale=False, logit_softcap=0.0, attn_softcap=0.0, norm_plus_one=False,
                 query_pre_attn_scalar=0.0, lm_head_bias=False, rope_mscale_all_dim=0.0,
                 qk_norm='head' if kind == 'qwen3' else 'none')
  if kind == 'qwen2':
    common.require(cfg, kind, qkv_bias=True, o_bias=False)
  elif cfg.qkv_bias != cfg.o_bias:
    raise ValueError(f'{kind} checkpoints have biases on all of q, k, v, o or on none (attention_bias)')
  if cfg.sliding_window and (kind == 'llama' or (kind == 'mistral' and cfg.sliding_every != 1)):
    raise ValueError(f'{kind} checkpoints cannot express sliding_window={cfg.sliding_window} with '
                     f'sliding_every={cfg.sliding_every}')
  hf = {'model_type': kind, 'architectures': [ARCHITECTURES[kind]], 'vocab_size': cfg.vocab_size,
        'hidden_size': cfg.d_model, 'intermediate_size': cfg.ffn_size, 'num_hidden_layers': cfg.n_layers,
        'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_size,
        'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
        'max_position_embeddings': cfg.max_seq_len, 'dtype': cfg.param_dtype, **common.rope_to_hf(cfg)}
  if kind != 'qwen2':
    hf['attention_bias'] = cfg.qkv_bias
  if kind == 'mistral':
    hf['sliding_window'] = cfg.sliding_window or None
  elif kind != 'llama':
    hf.update(common.sliding_to_hf(cfg), use_sliding_window=bool(cfg.sliding_window), max_window_layers=0)
  return hf


def rules(cfg: ModelConfig) -> list[common.Rule]:
  """Every checkpoint tensor of `cfg` with its slmjax parameter."""
  D, H, K, Z, F, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.ffn_size, cfg.vocab_size
  out = [plain('model.embed_tokens.weight', 'embed_VD', (V, D)), plain('model.norm.weight', 'final_norm.scale', (D,))]
  if not cfg.tie_embeddings:
    out.append(linear('lm_head.weight', 'lm_head_DV', (D,), (V,)))
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    out += [plain(hf + 'input_layernorm.weight', us + 'attn_norm.scale', (D,)),
            plain(hf + 'post_attention_layernorm.weight', us + 'ffn_norm.scale', (D,))]
    out += attention_rules(cfg, hf + 'self_attn.', us + 'attn.')
    out += [linear(hf + 'mlp.gate_proj.weight', us + 'ffn.w_gate_DF', (D,), (F,)),
            linear(hf + 'mlp.up_proj.weight', us + 'ffn.w_up_DF', (D,), (F,)),
            linear(hf + 'mlp.down_proj.weight', us + 'ffn.w_down_FD', (F,), (D,))]
  return out


def attention_rules(cfg: ModelConfig, hf: str, us: str) -> list[common.Rule]:
  """A GQA attention's tensors under the prefixes `hf` (…self_attn.) and `us` (…attn.); shared by families."""
  D, H, K, Z = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
  out = [linear(hf + 'q_proj.weight', us + 'w_q_DHZ', (D,), (H, Z)),
         linear(hf + 'k_proj.weight', us + 'w_k_DKZ', (D,), (K, Z)),
         linear(hf + 'v_proj.weight', us + 'w_v_DKZ', (D,), (K, Z)),
         linear(hf + 'o_proj.weight', us + 'w_o_HZD', (H, Z), (D,))]
  if cfg.qkv_bias:
    out += [plain(hf + 'q_proj.bias', us + 'b_q_HZ', (H, Z), (H * Z,)),
            plain(hf + 'k_proj.bias', us + 'b_k_KZ', (K, Z), (K * Z,)),
            plain(hf + 'v_proj.bias', us + 'b_v_KZ', (K, Z), (K * Z,))]
  if cfg.o_bias:
    out.append(plain(hf + 'o_proj.bias', us + 'b_o_D', (D,)))
  if cfg.qk_norm == 'head':
    out += [plain(hf + 'q_norm.weight', us + 'q_norm.scale', (Z,)),
            plain(hf + 'k_norm.weight', us + 'k_norm.scale', (Z,))]
  elif cfg.qk_norm == 'full':
    out += [plain(hf + 'q_norm.weight', us + 'q_norm.scale', (H * Z,)),
            plain(hf + 'k_norm.weight', us + 'k_norm.scale', (K * Z,))]
  return out


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): not a parameter here.
  return common.import_rules(rules(cfg), tensors, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return common.export_rules(rules(cfg), state)
