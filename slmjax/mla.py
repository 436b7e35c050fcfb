"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; also DeepSeek-V3 and Kimi K2).

Keys and values are rebuilt from one small latent per token (what an inference cache stores), queries optionally
from a low-rank latent too; rotary position goes through a separate narrow part of each head, with a single rotary
key shared by all heads, because rotary does not commute with the latent up-projection. This is the training form
(latents expanded to per-head keys and values); the inference trick of absorbing the up-projections into the query
and output matrices changes speed, not the parameters or the function. Rotary uses the half-split layout of
`layers.apply_rope` (DeepSeek's checkpoints pair interleaved dimensions: a fixed permutation of the rotary columns)
and the plain 1/sqrt(H + R) logit scale (DeepSeek's YaRN factor for long context has no parameters).

Dimension letters: B batch, T query time, S key time, D d_model, N heads, H no-rope q/k width per head
(`head_dim`), R rotary width (`qk_rope_dim`), U value width per head (`v_head_dim`), L query latent rank
(`q_lora_rank`), C key/value latent rank (`kv_lora_rank`), Q = H + R the q/k width per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.layers import Norm, apply_rope, causal_attention, dtype_of, linear, make_param


class MLAttention(nnx.Module):
  """Causal MLA. Parameter layout (HF DeepSeek names in brackets):

  query: w_dq_DL [q_a_proj], q_norm [q_a_layernorm], w_uq_LNQ [q_b_proj] with Q = H + R, when q_lora_rank > 0;
         else one w_q_DNQ [q_proj] (DeepSeek-V2-Lite);
  key/value: w_dkv_DC and w_kr_DR [together kv_a_proj_with_mqa], kv_norm [kv_a_layernorm],
         w_uk_CNH and w_uv_CNU [together kv_b_proj]; output: w_o_NUD [o_proj] (+ b_o_D if o_bias).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, H, R, U, L, C = (cfg.d_model, cfg.n_heads, cfg.head_size, cfg.rope_size, cfg.v_head_size,
                           cfg.q_lora_rank, cfg.kv_rank)
    p = cfg.param_dtype
    self.cfg = cfg
    if L:
      self.w_dq_DL = make_param(rngs, (D, L), ('embed', 'latent'), p)
      self.q_norm = Norm(L, cfg, rngs)
      self.w_uq_LNQ = make_param(rngs, (L, N, H + R), ('latent', 'q_heads', 'head_dim'), p)
    else:
      self.w_q_DNQ = make_param(rngs, (D, N, H + R), ('embed', 'q_heads', 'head_dim'), p)
    self.w_dkv_DC = make_param(rngs, (D, C), ('embed', 'latent'), p)
    self.w_kr_DR = make_param(rngs, (D, R), ('embed', 'head_dim'), p)
    self.kv_norm = Norm(C, cfg, rngs)
    self.w_uk_CNH = make_param(rngs, (C, N, H), ('latent', 'q_heads', 'head_dim'), p)
    self.w_uv_CNU = make_param(rngs, (C, N, U), ('latent', 'q_heads', 'head_dim'), p)
    self.w_o_NUD = make_param(rngs, (N, U, D), ('q_heads', 'head_dim', 'embed'), p, fan_in=N * U)
    if cfg.o_bias:
      self.b_o_D = make_param(rngs, (D,), ('embed',), p, init='zeros')

  def __call__(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, T, _ = x_BTD.shape
    N, H = cfg.n_heads, cfg.head_size
    if cfg.q_lora_rank:
      cq_BTL = self.q_norm(linear(x_BTD, self.w_dq_DL[...].astype(dt)))
      q_BTNQ = linear(cq_BTL, self.w_uq_LNQ[...].astype(dt))
    else:
      q_BTNQ = linear(x_BTD, self.w_q_DNQ[...].astype(dt))
    q_BTNQ = jnp.concatenate([q_BTNQ[..., :H], apply_rope(q_BTNQ[..., H:], cos_TR, sin_TR)], axis=-1)
    ckv_BSC = self.kv_norm(linear(x_BTD, self.w_dkv_DC[...].astype(dt)))
    kr_BS1R = apply_rope(linear(x_BTD, self.w_kr_DR[...].astype(dt))[:, :, None], cos_TR, sin_TR)
    k_BSNH = linear(ckv_BSC, self.w_uk_CNH[...].astype(dt))
    k_BSNQ = jnp.concatenate([k_BSNH, jnp.broadcast_to(kr_BS1R, (B, T, N, kr_BS1R.shape[-1]))], axis=-1)
    v_BSNU = linear(ckv_BSC, self.w_uv_CNU[...].astype(dt))
    out_BTN1U = causal_attention(q_BTNQ[:, :, :, None], k_BSNQ, v_BSNU, cfg.attn_softcap)
    y_BTD = linear(out_BTN1U[:, :, :, 0], self.w_o_NUD[...].astype(dt), n_in=2)
    if cfg.o_bias:
      y_BTD = y_BTD + self.b_o_D[...].astype(dt)
    return y_BTD
