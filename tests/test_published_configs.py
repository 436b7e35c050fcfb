"""Published config.json files (transcribed here: no download) import as the presets that transcribe them, so the
importer reads every field a real checkpoint sets (rotary scaling, windows, MLA, routing) and each preset is the
architecture its checkpoint loads as. Counts are then `counting`'s for both."""

import dataclasses
import math

import pytest

from slmjax import convert, counting, presets
from slmjax.config import ModelConfig

# Phi-3.5-MoE's longrope lists hold 64 numbers each (head_dim 128); these stand-ins have the published length.
PHI_FACTORS = {'short_factor': [1.0 + i / 64 for i in range(64)], 'long_factor': [1.0 + i / 8 for i in range(64)]}

PUBLISHED = {
    'llama-3.2-1b': {
        'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'head_dim': 64, 'hidden_act': 'silu',
        'hidden_size': 2048, 'intermediate_size': 8192, 'max_position_embeddings': 131072, 'mlp_bias': False,
        'model_type': 'llama', 'num_attention_heads': 32, 'num_hidden_layers': 16, 'num_key_value_heads': 8,
        'rms_norm_eps': 1e-05, 'rope_scaling': {'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
                                                'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
        'rope_theta': 500000.0, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16', 'vocab_size': 128256},
    'gemma-2-2b': {
        'architectures': ['Gemma2ForCausalLM'], 'attention_bias': False, 'attn_logit_softcapping': 50.0,
        'cache_implementation': 'hybrid', 'final_logit_softcapping': 30.0, 'head_dim': 256,
        'hidden_act': 'gelu_pytorch_tanh', 'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 2304,
        'intermediate_size': 9216, 'max_position_embeddings': 8192, 'model_type': 'gemma2', 'num_attention_heads': 8,
        'num_hidden_layers': 26, 'num_key_value_heads': 4, 'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06,
        'rope_theta': 10000.0, 'sliding_window': 4096, 'torch_dtype': 'float32', 'vocab_size': 256000},
    'mistral-7b': {
        'architectures': ['MistralForCausalLM'], 'hidden_act': 'silu', 'hidden_size': 4096, 'intermediate_size': 14336,
        'max_position_embeddings': 32768, 'model_type': 'mistral', 'num_attention_heads': 32, 'num_hidden_layers': 32,
        'num_key_value_heads': 8, 'rms_norm_eps': 1e-05, 'rope_theta': 10000.0, 'sliding_window': 4096,
        'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'vocab_size': 32000},
    'mixtral-8x7b': {
        'architectures': ['MixtralForCausalLM'], 'hidden_act': 'silu', 'hidden_size': 4096, 'intermediate_size': 14336,
        'max_position_embeddings': 32768, 'model_type': 'mixtral', 'num_attention_heads': 32, 'num_experts_per_tok': 2,
        'num_hidden_layers': 32, 'num_key_value_heads': 8, 'num_local_experts': 8, 'rms_norm_eps': 1e-05,
        'rope_theta': 1000000.0, 'router_aux_loss_coef': 0.02, 'sliding_window': None, 'tie_word_embeddings': False,
        'torch_dtype': 'bfloat16', 'vocab_size': 32000},
    'phi-3.5-moe': {
        'architectures': ['PhiMoEForCausalLM'], 'attention_bias': True, 'hidden_act': 'silu', 'hidden_size': 4096,
        'input_jitter_noise': 0.01, 'intermediate_size': 6400, 'lm_head_bias': True,
        'max_position_embeddings': 131072, 'model_type': 'phimoe', 'num_attention_heads': 32,
        'num_experts_per_tok': 2, 'num_hidden_layers': 32, 'num_key_value_heads': 8, 'num_local_experts': 16,
        'original_max_position_embeddings': 4096, 'rms_norm_eps': 1e-05,
        'rope_scaling': {'long_mscale': 1.243163121016122, 'original_max_position_embeddings': 4096,
                         'short_mscale': 1.243163121016122, 'type': 'longrope', **PHI_FACTORS},
        'rope_theta': 10000.0, 'router_aux_loss_coef': 0.0, 'router_jitter_noise': 0.01, 'sliding_window': 131072,
        'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'vocab_size': 32064},
    'deepseek-v2-lite': {
        'architectures': ['DeepseekV2ForCausalLM'], 'attention_bias': False, 'aux_loss_alpha': 0.001,
        'first_k_dense_replace': 1, 'hidden_act': 'silu', 'hidden_size': 2048, 'intermediate_size': 10944,
        'kv_lora_rank': 512, 'max_position_embeddings': 163840, 'model_type': 'deepseek_v2',
        'moe_intermediate_size': 1408, 'moe_layer_freq': 1, 'n_group': 1, 'n_routed_experts': 64,
        'n_shared_experts': 2, 'norm_topk_prob': False, 'num_attention_heads': 16, 'num_experts_per_tok': 6,
        'num_hidden_layers': 27, 'num_key_value_heads': 16, 'q_lora_rank': None, 'qk_nope_head_dim': 128,
        'qk_rope_head_dim': 64, 'rms_norm_eps': 1e-06,
        'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 0.707, 'mscale_all_dim': 0.707,
                         'original_max_position_embeddings': 4096, 'type': 'yarn'},
        'rope_theta': 10000, 'routed_scaling_factor': 1.0, 'scoring_func': 'softmax', 'seq_aux': True,
        'tie_word_embeddings': False, 'topk_group': 1, 'topk_method': 'greedy', 'torch_dtype': 'bfloat16',
        'v_head_dim': 128, 'vocab_size': 102400},
    # The Hub checkpoint is fp8 (quantization_config); its bfloat16 conversion has this config without it.
    'deepseek-v3': {
        'architectures': ['DeepseekV3ForCausalLM'], 'attention_bias': False, 'first_k_dense_replace': 3,
        'hidden_act': 'silu', 'hidden_size': 7168, 'intermediate_size': 18432, 'kv_lora_rank': 512,
        'max_position_embeddings': 163840, 'model_type': 'deepseek_v3', 'moe_intermediate_size': 2048,
        'moe_layer_freq': 1, 'n_group': 8, 'n_routed_experts': 256, 'n_shared_experts': 1, 'norm_topk_prob': True,
        'num_attention_heads': 128, 'num_experts_per_tok': 8, 'num_hidden_layers': 61, 'num_key_value_heads': 128,
        'num_nextn_predict_layers': 1, 'q_lora_rank': 1536, 'qk_nope_head_dim': 128, 'qk_rope_head_dim': 64,
        'rms_norm_eps': 1e-06,
        'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0,
                         'original_max_position_embeddings': 4096, 'type': 'yarn'},
        'rope_theta': 10000, 'routed_scaling_factor': 2.5, 'scoring_func': 'sigmoid', 'seq_aux': True,
        'tie_word_embeddings': False, 'topk_group': 4, 'topk_method': 'noaux_tc', 'torch_dtype': 'bfloat16',
        'v_head_dim': 128, 'vocab_size': 129280},
}

# What a preset sets differently on purpose: one context length for every preset (presets.SEQ), its dtypes, how it
# trains (runtime fields); Phi-3.5-MoE's preset leaves out the factor lists (see its docstring).
NOT_COMPARED = {'max_seq_len', 'dtype', 'param_dtype'} | {
    f.name for f in dataclasses.fields(ModelConfig) if f.metadata['runtime']}
PHI_ROPE = {'rope_scaling', 'rope_original_max_len', 'rope_attention_factor', 'rope_short_factor',
            'rope_long_factor'}


def architecture(cfg: ModelConfig, skip: set[str]) -> dict:
  """The compared fields, spelled one way: head_dim as the head size it derives, and Mixtral's softmax over the
  top-k logits as the renormalised softmax_topk transformers computes (the same gates: tests/test_router.py)."""
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
  fields['head_dim'] = cfg.head_size
  if cfg.router == 'topk_softmax':
    fields.update(router='softmax_topk', router_renormalize=True)
  return fields


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_config_imports_as_its_preset(name):
  imported = convert.config_from_hf(PUBLISHED[name])
  skip = NOT_COMPARED | (PHI_ROPE if name == 'phi-3.5-moe' else set())
  mine, theirs = architecture(presets.get(name), skip), architecture(imported, skip)
  assert mine == theirs, {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
  assert counting.analytic_counts(imported) == counting.analytic_counts(presets.get(name))


def test_long_context_settings_are_read():
  """The values the comparison above would pass vacuously if the importer dropped them."""
  v3 = convert.config_from_hf(PUBLISHED['deepseek-v3'])
  assert (v3.rope_scaling, v3.rope_factor, v3.rope_original_max_len, v3.rope_mscale_all_dim) == ('yarn', 40.0, 4096,
                                                                                                 1.0)
  assert v3.attention_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
  phi = convert.config_from_hf(PUBLISHED['phi-3.5-moe'])
  assert (phi.rope_scaling, phi.rope_attention_factor, len(phi.rope_long_factor)) == ('longrope', 1.243163121016122,
                                                                                      64)
  gemma = convert.config_from_hf(PUBLISHED['gemma-2-2b'])
  assert (gemma.sliding_window, gemma.sliding_every, gemma.query_pre_attn_scalar) == (4096, 2, 256.0)


def test_quantized_checkpoint_is_refused_in_one_line():
  with pytest.raises(ValueError, match=r'quantized checkpoints \(fp8\) are not read.*fp8_cast_bf16'):
    convert.config_from_hf({**PUBLISHED['deepseek-v3'],
                            'quantization_config': {'quant_method': 'fp8', 'weight_block_size': [128, 128]}})
