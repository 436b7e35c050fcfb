"""Named architectures: published dense and MoE models at full size, their scaled-down twins, and size ladders of
one architecture (`preset_ladder`).

Each real preset is the model's published `config.json` (or technical report) transcribed field by field into a
ModelConfig; its docstring names the source, the published parameter counts and the command that shows ours.
Only the language model is built (no vision encoder, no multi-token-prediction module). Features without parameters
are transcribed too where slmjax has them (sliding windows, Gemma's logit scale and zero-centred norms, Llama 3.2's
and DeepSeek's rotary scaling), so a preset is what its config.json imports as (tests/test_published_configs.py
checks seven against their transcribed config.json); what slmjax lacks (chunked attention, NoPE layers) or what
could not be transcribed offline (Phi-3.5-MoE's 64-number longrope factor lists) is left out and said so.
`max_seq_len` is 4096 everywhere: RoPE has no parameters, and FLOPs per token are then compared at one context
length.

  python experiments/count.py --preset=mixtral-8x7b                 # one model
  python experiments/count.py --preset=all                          # the table of every preset
  python experiments/count.py --preset=deepseek-v3 --scale_down     # the same architecture, tiny

`scale_down(cfg)` keeps every structural feature (attention kind, GQA, biases, norms, dense prefix, MoE spacing,
shared experts and gate, router kind) at dimensions a CPU trains in seconds, and `preset_ladder(name)` a ladder
of one published architecture's family (the dense / MoE size ladders of sweeps are in `slmjax.sweep`).
"""

from __future__ import annotations

from typing import Callable

from slmjax.config import ModelConfig

SEQ = 4096
PRESETS: dict[str, Callable[[], ModelConfig]] = {}
# Published (total, active) parameter counts: an int is exact (the checkpoint's tensor count), a string like
# '46.7B' is the rounded figure of the model card / report, good to half a unit of its last digit.
PUBLISHED: dict[str, tuple[int | str, int | str]] = {}


def preset(name: str, total: int | str, active: int | str | None = None):
  """Register a zero-argument function returning a full-size ModelConfig under `name`."""
  def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    PRESETS[name] = fn
    PUBLISHED[name] = (total, total if active is None else active)
    return fn
  return register


def get(name: str) -> ModelConfig:
  """The full-size ModelConfig of preset `name` (ValueError listing the names if unknown)."""
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')
  return PRESETS[name]()


def names() -> list[str]:
  return list(PRESETS)


def _llama(**fields) -> ModelConfig:
  """Llama-family defaults: RMSNorm, SwiGLU, RoPE, no biases, untied, dropless routing."""
  return ModelConfig(**{'norm_eps': 1e-5, 'tie_embeddings': False, 'max_seq_len': SEQ, 'capacity_factor': None,
                        **fields})


# Dense models.

@preset('smollm2-135m', '135M')
def smollm2_135m():
  """SmolLM2-135M (HF HuggingFaceTB/SmolLM2-135M config.json; Allal et al. 2025, arXiv:2502.02737).

  Llama architecture, GQA 9 heads / 3 kv heads, tied embeddings. Published 135M.
  Run: python experiments/count.py --preset=smollm2-135m
  """
  return _llama(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                rope_theta=100_000.0, tie_embeddings=True)


@preset('smollm2-360m', '360M')
def smollm2_360m():
  """SmolLM2-360M (HF HuggingFaceTB/SmolLM2-360M config.json). GQA 15 / 5, tied. Published 360M.

  Run: python experiments/count.py --preset=smollm2-360m
  """
  return _llama(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560,
                rope_theta=100_000.0, tie_embeddings=True)


@preset('smollm2-1.7b', '1.7B')
def smollm2_1_7b():
  """SmolLM2-1.7B (HF HuggingFaceTB/SmolLM2-1.7B config.json). Plain MHA (32 / 32), tied. Published 1.7B.

  Run: python experiments/count.py --preset=smollm2-1.7b
  """
  return _llama(vocab_size=49152, d_model=2048, n_layers=24, n_heads=32, d_ff=8192, rope_theta=130_000.0,
                tie_embeddings=True)


@preset('qwen2.5-0.5b', '0.49B')
def qwen2_5_0_5b():
  """Qwen2.5-0.5B (HF Qwen/Qwen2.5-0.5B config.json; Qwen2.5 report, arXiv:2412.15115, table 1).

  GQA 14 / 2, biases on q/k/v (not o), tied. Published 0.49B total, 0.36B non-embedding.
  Run: python experiments/count.py --preset=qwen2.5-0.5b
  """
  return _llama(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864, qkv_bias=True,
                norm_eps=1e-6, rope_theta=1_000_000.0, tie_embeddings=True)


@preset('qwen2.5-1.5b', '1.54B')
def qwen2_5_1_5b():
  """Qwen2.5-1.5B (HF Qwen/Qwen2.5-1.5B config.json). GQA 12 / 2, q/k/v biases, tied.

  Published 1.54B total, 1.31B non-embedding. Run: python experiments/count.py --preset=qwen2.5-1.5b
  """
  return _llama(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960, qkv_bias=True,
                norm_eps=1e-6, rope_theta=1_000_000.0, tie_embeddings=True)


LLAMA_3_2_ROPE = dict(rope_scaling='llama3', rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_len=8192)


@preset('llama-3.2-1b', '1.23B')
def llama_3_2_1b():
  """Llama 3.2 1B (HF meta-llama/Llama-3.2-1B config.json). GQA 32 / 8, head_dim 64, tied, llama3 rotary
  scaling (factor 32 over 8192). Published 1.23B.

  Run: python experiments/count.py --preset=llama-3.2-1b
  """
  return _llama(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
                rope_theta=500_000.0, tie_embeddings=True, **LLAMA_3_2_ROPE)


@preset('llama-3.2-3b', '3.21B')
def llama_3_2_3b():
  """Llama 3.2 3B (HF meta-llama/Llama-3.2-3B config.json). GQA 24 / 8, head_dim 128, tied. Published 3.21B.

  Run: python experiments/count.py --preset=llama-3.2-3b
  """
  return _llama(vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, d_ff=8192,
                rope_theta=500_000.0, tie_embeddings=True, **LLAMA_3_2_ROPE)


@preset('llama-3-8b', '8.03B')
def llama_3_8b():
  """Llama 3 8B (HF meta-llama/Meta-Llama-3-8B config.json; Dubey et al. 2024, arXiv:2407.21783, table 3).

  GQA 32 / 8, untied. Published 8.03B. Run: python experiments/count.py --preset=llama-3-8b
  """
  return _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                rope_theta=500_000.0)


@preset('gemma-2-2b', '2.61B')
def gemma_2_2b():
  """Gemma 2 2B (HF google/gemma-2-2b config.json; Gemma Team 2024, arXiv:2408.00118, tables 1-2).

  GQA 8 / 4 with head_dim 256 (d_model 2304), GeGLU (tanh GELU), four RMSNorms a block, embeddings scaled by
  sqrt(d_model), tied, soft-capped attention (50) and final (30) logits, logits scaled by 256 ** -0.5
  (query_pre_attn_scalar), norm gains stored zero-centred, 4096-token sliding windows on the even layers.
  Published 2.61B; the report's non-embedding count 2,024,517,888 is exact
  here (its embedding count uses a 256,128-row table, the checkpoint has 256,000).
  Run: python experiments/count.py --preset=gemma-2-2b
  """
  return _llama(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, d_ff=9216,
                activation='geglu', norm_eps=1e-6, post_norms=True, embed_scale=True, attn_softcap=50.0,
                logit_softcap=30.0, tie_embeddings=True, norm_plus_one=True, query_pre_attn_scalar=256.0,
                sliding_window=4096, sliding_every=2)


@preset('mistral-7b', '7.24B')
def mistral_7b():
  """Mistral 7B v0.1 (HF mistralai/Mistral-7B-v0.1 config.json; Jiang et al. 2023, arXiv:2310.06825).

  GQA 32 / 8, vocabulary 32000, untied, a 4096-token sliding window on every layer. Published 7.24B.
  Run: python experiments/count.py --preset=mistral-7b
  """
  return _llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                sliding_window=4096)


# Mixture-of-Experts models.

@preset('mixtral-8x7b', '46.7B', '12.9B')
def mixtral_8x7b():
  """Mixtral 8x7B v0.1 (HF mistralai/Mixtral-8x7B-v0.1 config.json; Jiang et al. 2024, arXiv:2401.04088).

  Mistral 7B's attention with 8 experts of width 14336 in every layer, top-2, softmax over the two chosen
  logits. Published 46.7B total, 12.9B active ("47B / 13B").
  Run: python experiments/count.py --preset=mixtral-8x7b
  """
  return _llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                rope_theta=1_000_000.0, n_experts=8, top_k=2, router='topk_softmax')


@preset('mixtral-8x22b', '141B', '39B')
def mixtral_8x22b():
  """Mixtral 8x22B v0.1 (HF mistral-community/Mixtral-8x22B-v0.1 config.json; Mistral AI announcement).

  56 layers, d_model 6144, GQA 48 / 8, 8 experts of width 16384, top-2. Published 141B total, 39B active.
  Run: python experiments/count.py --preset=mixtral-8x22b
  """
  return _llama(vocab_size=32000, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, d_ff=16384,
                rope_theta=1_000_000.0, n_experts=8, top_k=2, router='topk_softmax')


@preset('phi-3.5-moe', '41.9B', '6.6B')
def phi_3_5_moe():
  """Phi-3.5-MoE (HF microsoft/Phi-3.5-MoE-instruct config.json and transformers' modeling_phimoe).

  LayerNorm with bias, biases on q/k/v/o (attention_bias) and on the lm_head (lm_head_bias), untied,
  16 experts of width 6400, top-2 by SparseMixer (router='sparsemixer': its inference path, eps 0.01), a
  131072-token sliding window (its whole context). Its longrope factor lists (64 numbers each) are not transcribed
  here (no parameters; import the checkpoint for them). Published 41.9B total, 6.6B active.
  Run: python experiments/count.py --preset=phi-3.5-moe
  """
  return _llama(vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=6400,
                norm='layernorm', qkv_bias=True, o_bias=True, lm_head_bias=True, n_experts=16, top_k=2,
                router='sparsemixer', sparsemixer_eps=0.01, sliding_window=131072)


@preset('olmoe-1b-7b', '6.9B', '1.3B')
def olmoe_1b_7b():
  """OLMoE-1B-7B-0924 (HF allenai/OLMoE-1B-7B-0924 config.json; Muennighoff et al. 2024, arXiv:2409.02060).

  QK-norm over the full q and k projections (RMSNorm of width 2048 each), 64 experts of width 1024, top-8,
  softmax then top-k without renormalising. Published 6.9B total, 1.3B active.
  Run: python experiments/count.py --preset=olmoe-1b-7b
  """
  return _llama(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, d_ff=1024, qk_norm='full',
                n_experts=64, top_k=8, router_renormalize=False)


@preset('qwen1.5-moe-a2.7b', '14.3B', '2.7B')
def qwen1_5_moe_a2_7b():
  """Qwen1.5-MoE-A2.7B (HF Qwen/Qwen1.5-MoE-A2.7B config.json; Qwen blog "Qwen1.5-MoE").

  q/k/v biases, 60 experts of width 1408, top-4 without renormalising, plus one shared expert of width 5632
  whose output is scaled by a per-token sigmoid gate. Published 14.3B total, 2.7B active.
  Run: python experiments/count.py --preset=qwen1.5-moe-a2.7b
  """
  return _llama(vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, d_ff=5632, qkv_bias=True,
                norm_eps=1e-6, rope_theta=1_000_000.0, n_experts=60, top_k=4, d_expert=1408, n_shared_experts=1,
                d_shared=5632, shared_gate=True, router_renormalize=False)


@preset('qwen3-30b-a3b', '30.5B', '3.3B')
def qwen3_30b_a3b():
  """Qwen3-30B-A3B (HF Qwen/Qwen3-30B-A3B config.json; Qwen3 report, arXiv:2505.09388, table 2).

  GQA 32 / 4 with head_dim 128 (not d_model / heads = 64), per-head QK-norm, 128 experts of width 768, top-8,
  renormalised. Published 30.5B total, 3.3B active. Run: python experiments/count.py --preset=qwen3-30b-a3b
  """
  return _llama(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
                qk_norm='head', norm_eps=1e-6, rope_theta=1_000_000.0, n_experts=128, top_k=8, d_expert=768)


@preset('deepseek-v2-lite', '15.7B', '2.4B')
def deepseek_v2_lite():
  """DeepSeek-V2-Lite (HF deepseek-ai/DeepSeek-V2-Lite config.json; DeepSeek-AI 2024, arXiv:2405.04434, app. B).

  MLA without the query low-rank path (kv_lora_rank 512, rope 64, nope 128, value 128), first layer dense
  (width 10944), then 64 routed experts of width 1408, top-6, softmax without renormalising, plus 2 shared experts.
  YaRN rotary scaling (factor 40 over 4096, mscale = mscale_all_dim = 0.707). Published 15.7B total, 2.4B active.
  Run: python experiments/count.py --preset=deepseek-v2-lite
  """
  return _llama(vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, attention='mla', head_dim=128,
                kv_lora_rank=512, qk_rope_dim=64, v_head_dim=128, norm_eps=1e-6, d_ff=10944, n_experts=64, top_k=6,
                d_expert=1408, n_shared_experts=2, d_shared=1408, first_dense=1, router_renormalize=False,
                **deepseek_yarn(0.707))


def deepseek_yarn(mscale: float) -> dict:
  """DeepSeek's YaRN as published: factor 40 over 4096, beta 32 / 1, mscale = mscale_all_dim (so cos and sin
  are unscaled and the logits scaled by mscale(40) ** 2)."""
  return dict(rope_scaling='yarn', rope_factor=40.0, rope_original_max_len=4096, rope_beta_fast=32.0,
              rope_beta_slow=1.0, rope_attention_factor=1.0, rope_mscale_all_dim=mscale)


def _deepseek_v3(**fields) -> ModelConfig:
  # Balanced as published (arXiv:2412.19437, sections 2.1.2 and 4.2): the selection bias moves by gamma = 0.001
  # (the default bias_update_rate) a step, beside a tiny balance loss (alpha = 0.0001; DeepSeek's is
  # sequence-wise, ours over the batch).
  return _llama(**{'vocab_size': 129280, 'd_model': 7168, 'n_layers': 61, 'n_heads': 128, 'attention': 'mla',
                   'head_dim': 128, 'q_lora_rank': 1536, 'kv_lora_rank': 512, 'qk_rope_dim': 64, 'v_head_dim': 128,
                   'norm_eps': 1e-6, 'd_ff': 18432, 'n_experts': 256, 'top_k': 8, 'd_expert': 2048,
                   'n_shared_experts': 1, 'd_shared': 2048, 'first_dense': 3, 'router': 'sigmoid',
                   'router_bias': True, 'routed_scale': 2.5, 'balance': 'both', 'lb_loss_weight': 0.0001,
                   'router_groups': 8, 'router_topk_groups': 4, **deepseek_yarn(1.0), **fields})


@preset('deepseek-v3', 671_026_419_200, '37B')
def deepseek_v3():
  """DeepSeek-V3 main model (HF deepseek-ai/DeepSeek-V3 config.json; DeepSeek-AI 2024, arXiv:2412.19437).

  MLA with the query low-rank path (q 1536, kv 512), 3 dense layers (width 18432), then 256 routed experts of
  width 2048, top-8, sigmoid scores with a selection-only bias (e_score_correction_bias: a stored, not
  gradient-trained weight of 256 per MoE layer, counted as the checkpoint counts it), renormalised and scaled by
  2.5, plus 1 shared expert; group-limited routing (n_group 8, topk_group 4, groups ranked by the sum of their
  two best biased scores). Without the
  multi-token-prediction module (14B more: 685B in the checkpoint). Published 671B total, 37B active.
  Run: python experiments/count.py --preset=deepseek-v3
  """
  return _deepseek_v3()


@preset('kimi-k2', 1_026_408_232_448, '32B')
def kimi_k2():
  """Kimi K2 (HF moonshotai/Kimi-K2-Instruct config.json; Kimi Team 2025, arXiv:2507.20534).

  DeepSeek-V3's architecture with 64 heads, 384 experts, 1 dense layer, vocabulary 163840, routed scale 2.827;
  its YaRN settings are not transcribed (rope_scaling none).
  Published "1T" total (the checkpoint holds 1,026,408,232,448 language-model parameters), 32B active.
  Run: python experiments/count.py --preset=kimi-k2
  """
  return _deepseek_v3(vocab_size=163840, n_heads=64, n_experts=384, first_dense=1, routed_scale=2.827,
                      rope_theta=50_000.0, router_groups=1, router_topk_groups=1,  # n_group 1: no groups
                      rope_scaling='none', rope_mscale_all_dim=0.0)  # its YaRN settings: not transcribed


@preset('llama-4-maverick', '400B', '17B')
def llama_4_maverick():
  """Llama 4 Maverick 17B-128E, language model only (HF meta-llama/Llama-4-Maverick-17B-128E text_config).

  48 layers alternating dense (width 16384) and MoE (interleave_moe_layer_step 2: layers 1, 3, ..., 47), each
  MoE layer 128 experts of width 8192, top-1 with a sigmoid gate, plus 1 shared expert of width 8192. GQA 40 / 8,
  head_dim 128, untied. Not modelled (no parameters): NoPE layers, chunked attention. The vision encoder and
  projector are not counted. Published 400B total, 17B active.
  Run: python experiments/count.py --preset=llama-4-maverick
  """
  return _llama(vocab_size=202048, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128, d_ff=16384,
                rope_theta=500_000.0, n_experts=128, top_k=1, d_expert=8192, n_shared_experts=1, d_shared=8192,
                first_dense=1, moe_every=2, router='sigmoid', router_renormalize=False)


# Scaled-down twins and ladders.

def scale_down(cfg: ModelConfig, d_model: int = 64, n_layers: int | None = None, n_experts: int = 8,
               vocab_size: int = 256, max_seq_len: int = 128) -> ModelConfig:
  """The same architecture at small dimensions: every `structural_features` entry kept, sizes shrunk.

  4 heads (kv heads: 4, 2 or 1 as the original is MHA, GQA or MQA); head_dim decoupled from d_model / heads
  when the original's is; dense width 2 * d_model, expert width d_model / 2 unless the original's equal the
  dense width; at most `n_experts` experts and top-2 (top-1 stays top-1); the dense prefix cut to one layer;
  `n_layers` defaults to the fewest (at least 2) that show the dense prefix and the MoE spacing; MLA ranks a
  fraction of d_model; float32.
  """
  heads = 4
  kv = heads if cfg.kv_heads == cfg.n_heads else (1 if cfg.kv_heads == 1 else 2)
  decoupled = cfg.attention == 'mla' or cfg.head_size != cfg.d_model // cfg.n_heads
  head_dim = 2 * (d_model // heads) if decoupled else None
  first_dense = min(cfg.first_dense, 1) if cfg.is_moe else 0
  if n_layers is None:
    n_layers = max(2, first_dense + cfg.moe_every) if cfg.is_moe else 2
  d_ff = 2 * d_model
  changes = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=heads,
                 n_kv_heads=None if cfg.attention == 'mla' else kv, head_dim=head_dim, d_ff=d_ff,
                 max_seq_len=max_seq_len, dtype='float32', param_dtype='float32', first_dense=first_dense)
  if cfg.attention == 'mla':
    changes.update(q_lora_rank=d_model // 2 if cfg.q_lora_rank else 0, kv_lora_rank=d_model // 2,
                   qk_rope_dim=max(2, head_dim // 4 * 2), v_head_dim=None)
  if cfg.is_moe:
    d_expert = d_ff if cfg.expert_size == cfg.ffn_size else d_model // 2
    changes.update(n_experts=min(cfg.n_experts, n_experts), top_k=min(cfg.top_k, 2), d_expert=d_expert,
                   n_shared_experts=min(cfg.n_shared_experts, 2),
                   d_shared=d_expert if cfg.shared_size == cfg.expert_size else 2 * d_expert,
                   router_groups=min(cfg.router_groups, 4), router_topk_groups=min(cfg.router_topk_groups, 2))
  return cfg.replace(**changes)


def structural_features(cfg: ModelConfig) -> dict:
  """What makes an architecture itself, independent of its sizes (what `scale_down` must keep)."""
  features = dict(
      attention=cfg.attention, gqa=cfg.kv_heads < cfg.n_heads, mqa=cfg.kv_heads == 1,
      head_dim_decoupled=cfg.attention == 'gqa' and cfg.head_size != cfg.d_model // cfg.n_heads,
      q_low_rank=cfg.q_lora_rank > 0,
      qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm, attn_softcap=cfg.attn_softcap > 0,
      norm=cfg.norm, post_norms=cfg.post_norms, activation=cfg.activation, tie_embeddings=cfg.tie_embeddings,
      lm_head_bias=cfg.lm_head_bias, embed_scale=cfg.embed_scale, logit_softcap=cfg.logit_softcap > 0,
      moe=cfg.is_moe)
  if cfg.is_moe:
    features.update(
        dense_prefix=cfg.first_dense > 0, moe_every=cfg.moe_every, top1=cfg.top_k == 1, router=cfg.router,
        router_renormalize=cfg.router_renormalize, router_bias=cfg.router_bias,
        routed_scale=cfg.routed_scale != 1.0, shared=cfg.n_shared_experts > 0, shared_gate=cfg.shared_gate,
        router_groups=cfg.router_groups > 1,
        shared_width_differs=cfg.shared_size != cfg.expert_size,
        dense_width_differs=cfg.ffn_size != cfg.expert_size, dropless=cfg.dropless)
  return features


def preset_ladder(name: str, widths: tuple[int, ...] = (32, 48, 64, 96, 128)) -> list[ModelConfig]:
  """A size ladder of one published architecture (its scaled-down twin at each d_model), for sweeps."""
  return [scale_down(get(name), d_model=width) for width in widths]
