"""DeepSeek-V2 and DeepSeek-V3: Multi-head Latent Attention (slmjax/mla.py), a dense prefix of
first_k_dense_replace layers, then routed experts plus always-on shared experts (one MLP of width
n_shared_experts * moe_intermediate_size). Routers: V2 softmax, top-k (greedy, or group_limited_greedy: groups
ranked by their best score), gates not renormalised; V3 sigmoid with the selection-only e_score_correction_bias,
groups ranked by the sum of their two best biased scores, renormalised when norm_topk_prob. Both scale the gates by
routed_scaling_factor. Converted models are dropless.

Two checkpoint tensors hold two slmjax parameters each, and the rotary rows are permuted:
  self_attn.kv_a_proj_with_mqa.weight [J + R, D] -> attn.w_dkv_DJ and attn.w_kr_DR
  self_attn.kv_b_proj.weight [H * (Z + Y), J]    -> attn.w_uk_JHZ and attn.w_uv_JHY
  the R rotary rows of q_proj / q_b_proj (per head) and of kv_a_proj_with_mqa pair dimensions (2i, 2i + 1)
  (V2 always, V3 with rope_interleave, which its Hub checkpoints set); slmjax rotates half-split pairs (i, i + R/2), so import reorders those
  rows evens-then-odds (the same q.k, hence the same logits) and export restores them.
The latent norms use eps 1e-6 in transformers whatever rms_norm_eps says (slmjax: norm_eps); so does every
published DeepSeek config. YaRN rotary scaling converts with DeepSeek's extra logit scale (mscale_all_dim:
ModelConfig.rope_mscale_all_dim). V3's multi-token-prediction layers (num_nextn_predict_layers of them past
num_hidden_layers) are skipped on import, as transformers does: slmjax predicts the next token only. Not converted
(one-line errors): attention_bias, mlp_bias.

Shape letters: slmjax/shapes.py (here D, H, Z, R, Y, I, J, E, F; MLA's as in slmjax/mla.py).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import common, mixtral
from slmjax.convert.common import linear, plain

MODEL_TYPES = ('deepseek_v2', 'deepseek_v3')
ARCHITECTURES = {'deepseek_v2': 'DeepseekV2ForCausalLM', 'deepseek_v3': 'DeepseekV3ForCausalLM'}


def config_from_hf(hf: dict) -> ModelConfig:
  kind = hf['model_type']
  for flag in ('attention_bias', 'mlp_bias'):
    if hf.get(flag):
      raise ValueError(f'{flag}=true is not implemented for {kind}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act={hf["hidden_act"]!r} is not implemented for {kind} (silu only)')
  if kind == 'deepseek_v3' and not hf.get('rope_interleave', True):
    raise ValueError('deepseek_v3 with rope_interleave=false is not converted (the Hub checkpoints interleave)')
  heads = hf['num_attention_heads']
  if hf.get('num_key_value_heads') not in (None, heads):
    raise ValueError(f'num_key_value_heads={hf["num_key_value_heads"]} differs from num_attention_heads={heads}: '
                     'MLA has no kv heads to group')
  n_experts = hf['n_routed_experts']
  groups = {'router_groups': hf.get('n_group') or 1, 'router_topk_groups': hf.get('topk_group') or 1}
  if kind == 'deepseek_v3':
    router = {'router': 'sigmoid', 'router_bias': True, 'router_renormalize': bool(hf.get('norm_topk_prob', True)),
              **groups}
  else:
    if hf.get('norm_topk_prob'):
      raise ValueError('deepseek_v2 with norm_topk_prob=true: transformers ignores it, DeepSeek\'s code applies it; '
                       'not converted')
    method = hf.get('topk_method', 'greedy')
    if method not in ('greedy', 'group_limited_greedy'):
      raise ValueError(f'topk_method={method!r} is not implemented for deepseek_v2 (greedy, group_limited_greedy)')
    router = {'router': 'softmax_topk', 'router_renormalize': False}
    if method == 'group_limited_greedy':
      router.update(**groups)
  n_shared = hf.get('n_shared_experts') or 0
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'], n_heads=heads,
      attention='mla', head_dim=hf['qk_nope_head_dim'], qk_rope_dim=hf['qk_rope_head_dim'],
      v_head_dim=hf['v_head_dim'], q_lora_rank=hf.get('q_lora_rank') or 0, kv_lora_rank=hf['kv_lora_rank'],
      d_ff=hf['intermediate_size'], norm_eps=hf.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), max_seq_len=hf.get('max_position_embeddings', 4096),
      n_experts=n_experts, top_k=hf['num_experts_per_tok'], d_expert=hf['moe_intermediate_size'],
      n_shared_experts=n_shared, d_shared=hf['moe_intermediate_size'] if n_shared else None,
      first_dense=hf.get('first_k_dense_replace') or 0, routed_scale=float(hf.get('routed_scaling_factor', 1.0)),
      rope_mscale_all_dim=float(common.rope_params(hf).get('mscale_all_dim') or 0.0),
      **router, **mixtral.DROPLESS, **common.rope_from_hf(hf))


def model_type_of(cfg: ModelConfig) -> str | None:
  """deepseek_v3 for an MLA MoE with a sigmoid router and selection bias; deepseek_v2 for a softmax one."""
  if not cfg.is_moe or cfg.attention != 'mla' or cfg.moe_every != 1:
    return None
  if cfg.router == 'sigmoid' and cfg.router_bias:  # groups score the sum of their top 2 (slmjax.moe)
    return 'deepseek_v3'
  if cfg.router == 'softmax_topk' and not cfg.router_renormalize and not cfg.router_bias:  # groups: their max
    return 'deepseek_v2'
  return None


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
  kind = model_type or model_type_of(cfg)
  if kind not in MODEL_TYPES or model_type_of(cfg) != kind:
    raise ValueError(f'{kind} checkpoints cannot express this model (deepseek_v3: router=sigmoid with router_bias; '
                     'deepseek_v2: softmax_topk, not renormalised; both MLA)')
  common.require(cfg, kind, activation='swiglu', norm='rmsnorm', post_norms=False, embed_scale=False,
                 logit_softcap=0.0, attn_softcap=0.0, norm_plus_one=False, query_pre_attn_scalar=0.0,
                 lm_head_bias=False, o_bias=False, shared_gate=False)
  if cfg.n_shared_experts and cfg.shared_size != cfg.expert_size:
    raise ValueError(f'{kind} shared experts have the routed width: d_shared={cfg.shared_size} must equal '
                     f'd_expert={cfg.expert_size}')
  grouped = cfg.router_groups > 1
  hf = {'model_type': kind, 'architectures': [ARCHITECTURES[kind]], 'vocab_size': cfg.vocab_size,
        'hidden_size': cfg.d_model, 'intermediate_size': cfg.ffn_size, 'num_hidden_layers': cfg.n_layers,
        'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.n_heads, 'hidden_act': 'silu',
        'q_lora_rank': cfg.q_lora_rank or None, 'kv_lora_rank': cfg.kv_rank, 'qk_nope_head_dim': cfg.head_size,
        'qk_rope_head_dim': cfg.rope_size, 'v_head_dim': cfg.v_head_size, 'rms_norm_eps': cfg.norm_eps,
        'tie_word_embeddings': cfg.tie_embeddings, 'max_position_embeddings': cfg.max_seq_len,
        'n_routed_experts': cfg.n_experts, 'num_experts_per_tok': cfg.top_k,
        'moe_intermediate_size': cfg.expert_size, 'n_shared_experts': cfg.n_shared_experts or None,
        'first_k_dense_replace': cfg.first_dense, 'routed_scaling_factor': cfg.routed_scale,
        'norm_topk_prob': cfg.router_renormalize, 'n_group': cfg.router_groups,
        'topk_group': cfg.router_topk_groups, 'attention_bias': False, 'dtype': cfg.param_dtype,
        **common.rope_to_hf(cfg)}
  if kind == 'deepseek_v3':
    hf['rope_interleave'] = True
  else:
    hf.update(topk_method='group_limited_greedy' if grouped else 'greedy', mlp_bias=False)
  return hf


def rotary_order(R: int) -> np.ndarray:
  """Row order that takes interleaved rotary pairs (2i, 2i + 1) to half-split ones (i, i + R/2)."""
  return np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])


def permute_rope_rows(w: np.ndarray, heads: int, width: int, R: int, order: np.ndarray) -> np.ndarray:
  """w [heads * width, in] with each head's last R rows reordered by `order`."""
  w_HWI = w.reshape(heads, width, -1).copy()
  w_HWI[:, width - R:] = w_HWI[:, width - R:][:, order]
  return w_HWI.reshape(heads * width, -1)


def split_attention(tensors: dict[str, np.ndarray], cfg: ModelConfig, interleaved: bool) -> dict[str, np.ndarray]:
  """The checkpoint tensors with each layer's fused MLA projections split into one tensor per slmjax parameter
  (names suffixed :latent, :rope, :k, :v) and the rotary rows half-split."""
  D, H, Z, R, Y, J = cfg.d_model, cfg.n_heads, cfg.head_size, cfg.rope_size, cfg.v_head_size, cfg.kv_rank
  order = rotary_order(R) if interleaved else np.arange(R)
  out = dict(tensors)
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.self_attn.'
    q = p + ('q_b_proj.weight' if cfg.q_lora_rank else 'q_proj.weight')
    out[q] = permute_rope_rows(common.take(out, q, (H * (Z + R), cfg.q_lora_rank or D)), H, Z + R, R, order)
    kv_a = common.take(out, p + 'kv_a_proj_with_mqa.weight', (J + R, D))
    out[p + 'kv_a:latent'], out[p + 'kv_a:rope'] = kv_a[:J], kv_a[J:][order]
    kv_b_HWJ = common.take(out, p + 'kv_b_proj.weight', (H * (Z + Y), J)).reshape(H, Z + Y, J)
    out[p + 'kv_b:k'], out[p + 'kv_b:v'] = kv_b_HWJ[:, :Z].reshape(H * Z, J), kv_b_HWJ[:, Z:].reshape(H * Y, J)
    del out[p + 'kv_a_proj_with_mqa.weight'], out[p + 'kv_b_proj.weight']
  return out


def merge_attention(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The inverse of `split_attention` (interleaved rotary rows: what deepseek_v2 and rope_interleave expect)."""
  H, Z, R, Y, J = cfg.n_heads, cfg.head_size, cfg.rope_size, cfg.v_head_size, cfg.kv_rank
  back = np.argsort(rotary_order(R))
  out = {}
  for name, w in tensors.items():
    p, _, part = name.partition(':')
    if name.endswith(('q_b_proj.weight', 'q_proj.weight')) and '.self_attn.' in name:
      out[name] = np.ascontiguousarray(permute_rope_rows(w, H, Z + R, R, back))
    elif part == 'latent':
      out[p[:-len('kv_a')] + 'kv_a_proj_with_mqa.weight'] = np.concatenate(
          [w, tensors[p + ':rope'][back]])
    elif part == 'k':
      kv_HWJ = np.concatenate([w.reshape(H, Z, J), tensors[p + ':v'].reshape(H, Y, J)], axis=1)
      out[p[:-len('kv_b')] + 'kv_b_proj.weight'] = kv_HWJ.reshape(H * (Z + Y), J)
    elif not part:
      out[name] = w
  return out


def rules(cfg: ModelConfig) -> list[common.Rule]:
  D, E, H, Z, R, Y, I, J = (cfg.d_model, cfg.n_experts, cfg.n_heads, cfg.head_size, cfg.rope_size,
                            cfg.v_head_size, cfg.q_lora_rank, cfg.kv_rank)
  out = mixtral.embedding_rules(cfg)
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks.{i}.'
    a, b = hf + 'self_attn.', us + 'attn.'
    out += [plain(hf + 'input_layernorm.weight', us + 'attn_norm.scale', (D,)),
            plain(hf + 'post_attention_layernorm.weight', us + 'ffn_norm.scale', (D,))]
    if I:
      out += [linear(a + 'q_a_proj.weight', b + 'w_dq_DI', (D,), (I,)),
              plain(a + 'q_a_layernorm.weight', b + 'q_norm.scale', (I,)),
              linear(a + 'q_b_proj.weight', b + 'w_uq_IHO', (I,), (H, Z + R))]
    else:
      out.append(linear(a + 'q_proj.weight', b + 'w_q_DHO', (D,), (H, Z + R)))
    out += [linear(a + 'kv_a:latent', b + 'w_dkv_DJ', (D,), (J,)), linear(a + 'kv_a:rope', b + 'w_kr_DR', (D,), (R,)),
            plain(a + 'kv_a_layernorm.weight', b + 'kv_norm.scale', (J,)),
            linear(a + 'kv_b:k', b + 'w_uk_JHZ', (J,), (H, Z)), linear(a + 'kv_b:v', b + 'w_uv_JHY', (J,), (H, Y)),
            linear(a + 'o_proj.weight', b + 'w_o_HYD', (H, Y), (D,))]
    if not cfg.is_moe_layer(i):
      out += mixtral.dense_rules(hf + 'mlp.', us + 'ffn.', D, cfg.ffn_size)
      continue
    out.append(linear(hf + 'mlp.gate.weight', us + 'ffn.w_router_DE', (D,), (E,)))
    if cfg.router_bias:
      out.append(plain(hf + 'mlp.gate.e_score_correction_bias', us + 'ffn.b_select_E', (E,)))
    out += mixtral.expert_rules(cfg, hf + 'mlp.', us + 'ffn.')
    if cfg.n_shared_experts:
      out += mixtral.dense_rules(hf + 'mlp.shared_experts.', us + 'ffn.shared.', D,
                                 cfg.n_shared_experts * cfg.shared_size)
  return out


def without_mtp(tensors: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
  """The tensors less the multi-token-prediction modules, stored as layers n_layers.. (V3's model.layers.61.*;
  transformers ignores them too)."""
  def layer(name: str) -> int:
    parts = name.split('.')
    return int(parts[2]) if name.startswith('model.layers.') and parts[2].isdigit() else -1
  return {name: w for name, w in tensors.items() if layer(name) < n_layers}


def state_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.State:
  split = split_attention(without_mtp(tensors, cfg.n_layers), cfg, interleaved=True)
  return common.import_rules(rules(cfg), split, cfg, ignore=('lm_head.weight',) if cfg.tie_embeddings else ())


def state_to_hf(state: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
  return merge_attention(common.export_rules(rules(cfg), state), cfg)
