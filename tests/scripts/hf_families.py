"""Tiny configs of every Hugging Face family slmjax converts: name -> (model_type, config.json overrides).

Each is 2 layers of width 64 with a small vocabulary, so a fixture (tests/fixtures/hf/<name>/) stays small; each
switches on the features its family differs by (rope scaling, biases, QK-norm, sliding windows shorter than
the test sequence, soft-caps), so the parity test exercises them. Plain data: importable without torch.
"""

TINY = {'vocab_size': 128, 'hidden_size': 64, 'intermediate_size': 96, 'num_hidden_layers': 2,
        'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 64, 'rms_norm_eps': 1e-6}
SEQ_LEN = 32  # tokens.npy is [2, SEQ_LEN]; sliding windows below are shorter, so they matter
SEED = 0
# longrope's per-frequency divisors (rope_dim / 2 = 8 of them), as Phi-3 publishes 48-64 of them.
SHORT_FACTOR = [1.0, 1.05, 1.15, 1.3, 1.6, 2.0, 2.6, 3.2]
LONG_FACTOR = [1.0, 1.4, 2.1, 3.3, 5.0, 7.2, 9.6, 12.0]

FAMILIES: dict[str, tuple[str, dict]] = {
    # SmolLM2 / Llama 2 style: tied embeddings, plain rope.
    'llama': ('llama', {**TINY, 'tie_word_embeddings': True, 'rope_theta': 10_000.0}),
    # Llama 3.1 style: untied, llama3 rope scaling (a short original context, so the scaling changes the
    # frequencies at these widths), q/k/v/o biases (attention_bias).
    'llama3': ('llama', {**TINY, 'tie_word_embeddings': False, 'attention_bias': True,
                         'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 500_000.0, 'factor': 8.0,
                                             'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                             'original_max_position_embeddings': 16}}),
    # Position interpolation (rope_type linear), as in long-context Llama 2 derivatives.
    'llama-linear': ('llama', {**TINY, 'tie_word_embeddings': True,
                               'rope_parameters': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 10_000.0}}),
    # Phi-3 style longrope on a Llama: the test sequence (32) is longer than the pre-training length (16), so
    # the long factors apply (transformers' Llama switches to them per call), with attention factor sqrt(1.5).
    'llama-longrope': ('llama', {**TINY, 'tie_word_embeddings': True,
                                 'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 10_000.0,
                                                     'original_max_position_embeddings': 16,
                                                     'short_factor': SHORT_FACTOR, 'long_factor': LONG_FACTOR}}),
    'mistral': ('mistral', {**TINY, 'tie_word_embeddings': False, 'sliding_window': 8, 'rope_theta': 1e6}),
    'qwen2': ('qwen2', {**TINY, 'tie_word_embeddings': True, 'rope_theta': 1e6}),
    # Qwen2.5's long-context recipe (YaRN, factor 4): a pre-training length (256) whose ramp spans dimensions 0-4
    # of the 8 rotary frequencies; attention factor 0.1 ln 4 + 1 on cos and sin.
    'qwen2-yarn': ('qwen2', {**TINY, 'tie_word_embeddings': True, 'max_position_embeddings': 1024,
                             'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 10_000.0, 'factor': 4.0,
                                                 'original_max_position_embeddings': 256}}),
    # Qwen3: head_dim (32) is not hidden_size / heads (16); per-head q/k norms.
    'qwen3': ('qwen3', {**TINY, 'tie_word_embeddings': False, 'head_dim': 32, 'rope_theta': 1e6}),
    # Gemma 2: query_pre_attn_scalar (24) is not head_dim (16), local attention on even layers.
    'gemma2': ('gemma2', {**TINY, 'head_dim': 16, 'query_pre_attn_scalar': 24, 'sliding_window': 8,
                          'attn_logit_softcapping': 50.0, 'final_logit_softcapping': 30.0,
                          'hidden_activation': 'gelu_pytorch_tanh', 'rope_theta': 10_000.0}),
}

def yarn(mscale: float, mscale_all_dim: float) -> dict:
  """DeepSeek's YaRN rope_parameters at factor 4 over a pre-training length of 256 (published: 40 over 4096)."""
  return {'rope_type': 'yarn', 'rope_theta': 10_000.0, 'factor': 4.0, 'original_max_position_embeddings': 256,
          'beta_fast': 32, 'beta_slow': 1, 'mscale': mscale, 'mscale_all_dim': mscale_all_dim}


# The MoE families (tests/test_convert_moe.py): 4-8 experts of width 32, dropless in slmjax.
TINY_MOE = {**TINY, 'intermediate_size': 32}
MOE_FAMILIES: dict[str, tuple[str, dict]] = {
    'mixtral': ('mixtral', {**TINY_MOE, 'num_local_experts': 4, 'num_experts_per_tok': 2, 'rope_theta': 1e6,
                            'tie_word_embeddings': False}),
    # Qwen3-MoE: per-head QK-norm, head_dim 32 (not 64 / 4), 8 experts top-4 renormalised.
    'qwen3_moe': ('qwen3_moe', {**TINY, 'head_dim': 32, 'num_experts': 8, 'num_experts_per_tok': 4,
                                'moe_intermediate_size': 32, 'norm_topk_prob': True, 'rope_theta': 1e6,
                                'tie_word_embeddings': False}),
    # Qwen2-MoE: layer 0 dense (mlp_only_layers), a gated shared expert, gates not renormalised, qkv biases.
    'qwen2_moe': ('qwen2_moe', {**TINY, 'num_experts': 4, 'num_experts_per_tok': 2, 'moe_intermediate_size': 32,
                                'shared_expert_intermediate_size': 48, 'norm_topk_prob': False,
                                'mlp_only_layers': [0], 'rope_theta': 1e6, 'tie_word_embeddings': True}),
    # OLMoE: QK-norm over the whole projection (gains [H * Z], [K * Z]), 8 experts top-2, not renormalised.
    'olmoe': ('olmoe', {**TINY_MOE, 'num_experts': 8, 'num_experts_per_tok': 2, 'norm_topk_prob': False,
                        'rope_theta': 10_000.0, 'tie_word_embeddings': False}),
    # Phi-3.5-MoE: LayerNorm with bias, biases on q/k/v/o and the lm_head, sparsemixer top-2 (eps 0.01).
    # Its longrope as published: short_mscale = long_mscale; the test sequence (32) within the pre-training length
    # (64), where transformers' PhiMoE and slmjax both use the short factors.
    'phimoe': ('phimoe', {**TINY_MOE, 'num_local_experts': 4, 'num_experts_per_tok': 2, 'attention_bias': True,
                          'lm_head_bias': True, 'router_jitter_noise': 0.01, 'rms_norm_eps': 1e-5,
                          'max_position_embeddings': 256, 'tie_word_embeddings': False,
                          'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 10_000.0,
                                              'original_max_position_embeddings': 64, 'short_factor': SHORT_FACTOR,
                                              'long_factor': LONG_FACTOR, 'short_mscale': 1.2,
                                              'long_mscale': 1.2}}),
    # DeepSeek-V3: MLA with the query latent, interleaved rotary weights, layer 0 dense, sigmoid router with
    # e_score_correction_bias, 8 experts in 4 groups (best 2), renormalised, scaled by 2.5, 1 shared expert; YaRN
    # as published (mscale = mscale_all_dim = 1: cos and sin unscaled, the logits by mscale(4) ** 2).
    'deepseek_v3': ('deepseek_v3', {**TINY, 'num_key_value_heads': 4, 'q_lora_rank': 32, 'kv_lora_rank': 32,
                                    'qk_rope_head_dim': 8, 'qk_nope_head_dim': 16, 'v_head_dim': 24,
                                    'n_routed_experts': 8, 'n_group': 4, 'topk_group': 2, 'num_experts_per_tok': 2,
                                    'first_k_dense_replace': 1, 'n_shared_experts': 1, 'moe_intermediate_size': 32,
                                    'routed_scaling_factor': 2.5, 'norm_topk_prob': True, 'rope_interleave': True,
                                    'max_position_embeddings': 1024, 'rope_parameters': yarn(1.0, 1.0),
                                    'tie_word_embeddings': False}),
    # DeepSeek-V2 (Lite-style full-rank query): softmax router, group_limited_greedy (4 groups, best 2), gates
    # not renormalised, scaled by 1.5, 2 shared experts; YaRN with mscale 1 over mscale_all_dim 0.707, so both its
    # attention factor on cos and sin and the extra logit scale are not 1.
    'deepseek_v2': ('deepseek_v2', {**TINY, 'num_key_value_heads': 4, 'q_lora_rank': None, 'kv_lora_rank': 32,
                                    'qk_rope_head_dim': 8, 'qk_nope_head_dim': 16, 'v_head_dim': 16,
                                    'n_routed_experts': 8, 'n_group': 4, 'topk_group': 2, 'num_experts_per_tok': 3,
                                    'topk_method': 'group_limited_greedy', 'first_k_dense_replace': 1,
                                    'n_shared_experts': 2, 'moe_intermediate_size': 32,
                                    'routed_scaling_factor': 1.5, 'norm_topk_prob': False,
                                    'max_position_embeddings': 1024, 'rope_parameters': yarn(1.0, 0.707),
                                    'tie_word_embeddings': False}),
}
FAMILIES.update(MOE_FAMILIES)
