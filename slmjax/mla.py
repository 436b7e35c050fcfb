"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; also DeepSeek-V3 and Kimi K2).

Keys and values are rebuilt from one small latent per token (what an inference cache stores), queries optionally
from a low-rank latent too; rotary position goes through a separate narrow part of each head, with a single rotary
key shared by all heads, because rotary does not commute with the latent up-projection. This is the training form
(latents expanded to per-head keys and values); the inference trick of absorbing the up-projections into the query
and output matrices changes speed, not the parameters or the function. Rotary uses the half-split layout of
`layers.apply_rope` (DeepSeek's checkpoints pair interleaved dimensions: a fixed permutation of the rotary columns)
and the plain 1/sqrt(Z + R) logit scale (DeepSeek's YaRN factor for long context has no parameters).

Shape letters: slmjax/shapes.py. Here: B batch, T query time, U key time, D d_model, H heads, Z no-rope q/k width
per head (`head_dim`), R rotary width (`qk_rope_dim`), O = Z + R the q/k width per head, Y value width per head
(`v_head_dim`), I query latent rank (`q_lora_rank`), J key/value latent rank (`kv_lora_rank`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.layers import Norm, apply_rope, causal_attention, dtype_of, linear, make_param


class MLAttention(nnx.Module):
  """Causal MLA. Parameter layout (HF DeepSeek names in brackets):

  query: w_dq_DI [q_a_proj], q_norm [q_a_layernorm], w_uq_IHO [q_b_proj] with O = Z + R, when q_lora_rank > 0;
         else one w_q_DHO [q_proj] (DeepSeek-V2-Lite);
  key/value: w_dkv_DJ and w_kr_DR [together kv_a_proj_with_mqa], kv_norm [kv_a_layernorm],
         w_uk_JHZ and w_uv_JHY [together kv_b_proj]; output: w_o_HYD [o_proj] (+ b_o_D if o_bias).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, H, Z, R, Y, I, J = (cfg.d_model, cfg.n_heads, cfg.head_size, cfg.rope_size, cfg.v_head_size,
                           cfg.q_lora_rank, cfg.kv_rank)
    p = cfg.param_dtype
    self.cfg = cfg
    if I:
      self.w_dq_DI = make_param(rngs, (D, I), ('embed', 'latent'), p, role='attention')
      self.q_norm = Norm(I, cfg, rngs, 'attention_norm')
      self.w_uq_IHO = make_param(rngs, (I, H, Z + R), ('latent', 'q_heads', 'head_dim'), p, role='attention')
    else:
      self.w_q_DHO = make_param(rngs, (D, H, Z + R), ('embed', 'q_heads', 'head_dim'), p, role='attention')
    self.w_dkv_DJ = make_param(rngs, (D, J), ('embed', 'latent'), p, role='attention')
    self.w_kr_DR = make_param(rngs, (D, R), ('embed', 'head_dim'), p, role='attention')
    self.kv_norm = Norm(J, cfg, rngs, 'attention_norm')
    self.w_uk_JHZ = make_param(rngs, (J, H, Z), ('latent', 'q_heads', 'head_dim'), p, role='attention')
    self.w_uv_JHY = make_param(rngs, (J, H, Y), ('latent', 'q_heads', 'head_dim'), p, role='attention')
    self.w_o_HYD = make_param(rngs, (H, Y, D), ('q_heads', 'head_dim', 'embed'), p, role='attention', fan_in=H * Y)
    if cfg.o_bias:
      self.b_o_D = make_param(rngs, (D,), ('embed',), p, role='attention_bias', init='zeros')

  def __call__(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, T, _ = x_BTD.shape
    H, Z = cfg.n_heads, cfg.head_size
    if cfg.q_lora_rank:
      cq_BTI = self.q_norm(linear(x_BTD, self.w_dq_DI[...].astype(dt)))
      q_BTHO = linear(cq_BTI, self.w_uq_IHO[...].astype(dt))
    else:
      q_BTHO = linear(x_BTD, self.w_q_DHO[...].astype(dt))
    q_BTHO = jnp.concatenate([q_BTHO[..., :Z], apply_rope(q_BTHO[..., Z:], cos_TR, sin_TR)], axis=-1)
    ckv_BUJ = self.kv_norm(linear(x_BTD, self.w_dkv_DJ[...].astype(dt)))  # keys at the same positions: U = T
    kr_BU1R = apply_rope(linear(x_BTD, self.w_kr_DR[...].astype(dt))[:, :, None], cos_TR, sin_TR)
    k_BUHZ = linear(ckv_BUJ, self.w_uk_JHZ[...].astype(dt))
    k_BUHO = jnp.concatenate([k_BUHZ, jnp.broadcast_to(kr_BU1R, (B, T, H, kr_BU1R.shape[-1]))], axis=-1)
    v_BUHY = linear(ckv_BUJ, self.w_uv_JHY[...].astype(dt))
    out_BTH1Y = causal_attention(q_BTHO[:, :, :, None], k_BUHO, v_BUHY, cfg.attn_softcap)  # K = H heads, Q = 1
    y_BTD = linear(out_BTH1Y[:, :, :, 0], self.w_o_HYD[...].astype(dt), n_in=2)
    if cfg.o_bias:
      y_BTD = y_BTD + self.b_o_D[...].astype(dt)
    return y_BTD
