"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; also DeepSeek-V3 and Kimi K2).

Keys and values are rebuilt from one small latent per token (what an inference cache stores), queries optionally
from a low-rank latent too; rotary position goes through a separate narrow part of each head, with a single rotary
key shared by all heads, because rotary does not commute with the latent up-projection. Training and prefill expand
the latents to per-head keys and values; a cached decode step absorbs the up-projections into the query and output
instead (`MLAttention.cached`): the same function and parameters, read from a cache of latents. Rotary uses the half-split layout of
`layers.apply_rope` (DeepSeek's checkpoints pair interleaved dimensions: a fixed permutation of the rotary columns)
and the logit scale cfg.attention_scale: 1/sqrt(Z + R), times DeepSeek's YaRN mscale ** 2 when rope_mscale_all_dim
is set.

Shape letters: slmjax/shapes.py. Here: B batch, T query time, U key time, D d_model, H heads, Z no-rope q/k width
per head (`head_dim`), R rotary width (`qk_rope_dim`), O = Z + R the q/k width per head, Y value width per head
(`v_head_dim`), I query latent rank (`q_lora_rank`), J key/value latent rank (`kv_lora_rank`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.attention_core import causal_attention, softcap
from slmjax.config import ModelConfig
from slmjax.layers import Norm, apply_rope, dtype_of, linear, make_param, write_cache


class LatentCache(NamedTuple):
  """One MLA layer's inference cache, as DeepSeek keeps it: the normed key/value latent and the rotated shared
  rotary key of every position so far (J + R numbers a token, against 2 * H * Z for multi-head attention)."""
  ckv_BUJ: jax.Array
  kr_BUR: jax.Array

  @staticmethod
  def empty(cfg: ModelConfig, batch: int, length: int) -> 'LatentCache':
    dt = dtype_of(cfg.dtype)
    return LatentCache(jnp.zeros((batch, length, cfg.kv_rank), dt), jnp.zeros((batch, length, cfg.rope_size), dt))


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
    q_BTHO = self.query(x_BTD, cos_TR, sin_TR)
    ckv_BUJ, kr_BUR = self.latent(x_BTD, cos_TR, sin_TR)  # keys at the same positions: U = T
    return self.output(self.expanded_attention(q_BTHO, ckv_BUJ, kr_BUR))

  def cached(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array, cache: LatentCache, start
             ) -> tuple[jax.Array, LatentCache]:
    """Attention of T new positions start.. that also writes their latents into `cache`. A prefill (`start`
    the Python int 0) runs the training form on the new latents; a decode step attends over the cached latents
    with the up-projections absorbed (DeepSeek-V2 section 2.1.2): q_nope W_uk scores against the latent directly
    and the latent-weighted sum goes through W_uv, so a step never expands the cache to per-head keys/values."""
    q_BTHO = self.query(x_BTD, cos_TR, sin_TR)
    ckv_BTJ, kr_BTR = self.latent(x_BTD, cos_TR, sin_TR)
    cache = LatentCache(write_cache(cache.ckv_BUJ, ckv_BTJ, start), write_cache(cache.kr_BUR, kr_BTR, start))
    if isinstance(start, int) and start == 0:
      out_BTHY = self.expanded_attention(q_BTHO, ckv_BTJ, kr_BTR)
    else:
      out_BTHY = self.absorbed_attention(q_BTHO, cache, start)
    return self.output(out_BTHY), cache

  def query(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    """q_BTHO: the no-rope part Z, then the rotated part R of each head."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    Z = cfg.head_size
    if cfg.q_lora_rank:
      cq_BTI = self.q_norm(linear(x_BTD, self.w_dq_DI[...].astype(dt)))
      q_BTHO = linear(cq_BTI, self.w_uq_IHO[...].astype(dt))
    else:
      q_BTHO = linear(x_BTD, self.w_q_DHO[...].astype(dt))
    return jnp.concatenate([q_BTHO[..., :Z], apply_rope(q_BTHO[..., Z:], cos_TR, sin_TR)], axis=-1)

  def latent(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ckv_BUJ, kr_BUR) of the positions of x: the normed key/value latent and the rotated shared rotary key."""
    dt = dtype_of(self.cfg.dtype)
    ckv_BUJ = self.kv_norm(linear(x_BTD, self.w_dkv_DJ[...].astype(dt)))
    kr_BU1R = apply_rope(linear(x_BTD, self.w_kr_DR[...].astype(dt))[:, :, None], cos_TR, sin_TR)
    return ckv_BUJ, kr_BU1R[:, :, 0]

  def expanded_attention(self, q_BTHO: jax.Array, ckv_BUJ: jax.Array, kr_BUR: jax.Array) -> jax.Array:
    """out_BTHY of causal attention with the latents expanded to per-head keys and values (training form)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, U, _ = ckv_BUJ.shape
    H = cfg.n_heads
    k_BUHZ = linear(ckv_BUJ, self.w_uk_JHZ[...].astype(dt))
    k_BUHO = jnp.concatenate([k_BUHZ, jnp.broadcast_to(kr_BUR[:, :, None], (B, U, H, kr_BUR.shape[-1]))], axis=-1)
    v_BUHY = linear(ckv_BUJ, self.w_uv_JHY[...].astype(dt))
    out_BTH1Y = causal_attention(q_BTHO[:, :, :, None], k_BUHO, v_BUHY, cfg.attn_softcap,  # K = H heads, Q = 1
                                   scale=cfg.attention_scale, matmul=cfg.matmul)
    return out_BTH1Y[:, :, :, 0]

  def absorbed_attention(self, q_BTHO: jax.Array, cache: LatentCache, start) -> jax.Array:
    """out_BTHY of T queries at positions start.. over the cached latents, up-projections absorbed."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    T, U, Z = q_BTHO.shape[1], cache.ckv_BUJ.shape[1], cfg.head_size
    q_BTHJ = jnp.einsum('BTHZ,JHZ->BTHJ', q_BTHO[..., :Z], self.w_uk_JHZ[...].astype(dt))
    logits_BHTU = (jnp.einsum('BTHJ,BUJ->BHTU', q_BTHJ, cache.ckv_BUJ)
                   + jnp.einsum('BTHR,BUR->BHTU', q_BTHO[..., Z:], cache.kr_BUR))
    logits_BHTU = softcap(logits_BHTU.astype(jnp.float32) * cfg.attention_scale, cfg.attn_softcap)
    visible_TU = jnp.arange(U)[None, :] <= (start + jnp.arange(T))[:, None]
    logits_BHTU = jnp.where(visible_TU, logits_BHTU, jnp.finfo(jnp.float32).min)
    probs_BHTU = jax.nn.softmax(logits_BHTU, axis=-1).astype(cache.ckv_BUJ.dtype)
    ctx_BTHJ = jnp.einsum('BHTU,BUJ->BTHJ', probs_BHTU, cache.ckv_BUJ)
    return jnp.einsum('BTHJ,JHY->BTHY', ctx_BTHJ, self.w_uv_JHY[...].astype(dt))

  def output(self, out_BTHY: jax.Array) -> jax.Array:
    dt = dtype_of(self.cfg.dtype)
    y_BTD = linear(out_BTHY, self.w_o_HYD[...].astype(dt), n_in=2)
    if self.cfg.o_bias:
      y_BTD = y_BTD + self.b_o_D[...].astype(dt)
    return y_BTD
