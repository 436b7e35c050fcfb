"""The Transformer: pre-norm blocks of one shared attention design plus a dense or routed-expert FFN.

Shape letters: slmjax/shapes.py (here B, T, D, V, E, R).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig
from slmjax.layers import (Attention, DenseFFN, KVCache, Norm, dtype_of, linear, make_param, rope_at, rope_tables,
                           softcap)
from slmjax.mla import LatentCache, MLAttention
from slmjax.moe import MoEFFN, SelectionBias, balance_selection_bias

MOE_METRICS = ('lb_loss', 'z_loss', 'drop_fraction', 'router_entropy')


class Block(nnx.Module):
  """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE according to `cfg.is_moe_layer(layer)`.

  Attention is GQA or MLA (`cfg.attention`). With `post_norms` each sublayer output is normed again before the
  residual add, x + norm(attn(norm(x))): Gemma 2's four norms per block.
  """

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg.d_model, cfg, rngs)
    self.attn = MLAttention(cfg, rngs) if cfg.attention == 'mla' else Attention(cfg, rngs, cfg.window(layer))
    self.ffn_norm = Norm(cfg.d_model, cfg, rngs)
    self.is_moe = cfg.is_moe_layer(layer)
    self.ffn = MoEFFN(cfg, rngs) if self.is_moe else DenseFFN(cfg, cfg.ffn_size, rngs)
    self.post_norms = cfg.post_norms
    if cfg.post_norms:
      self.post_attn_norm = Norm(cfg.d_model, cfg, rngs)
      self.post_ffn_norm = Norm(cfg.d_model, cfg, rngs)

  def __call__(self, x_BTD, cos_TR, sin_TR) -> tuple[jax.Array, dict | None]:
    y_BTD = self.attn(self.attn_norm(x_BTD), cos_TR, sin_TR)
    return self.ffn_residual(x_BTD + (self.post_attn_norm(y_BTD) if self.post_norms else y_BTD))

  def cached(self, x_BTD, cos_TR, sin_TR, cache, start) -> tuple[jax.Array, KVCache | LatentCache]:
    """The block on T new positions start.., reading and extending its layer's attention cache."""
    y_BTD, cache = self.attn.cached(self.attn_norm(x_BTD), cos_TR, sin_TR, cache, start)
    x_BTD, _ = self.ffn_residual(x_BTD + (self.post_attn_norm(y_BTD) if self.post_norms else y_BTD))
    return x_BTD, cache

  def ffn_residual(self, x_BTD) -> tuple[jax.Array, dict | None]:
    extras = None
    if self.is_moe:
      y_BTD, extras = self.ffn(self.ffn_norm(x_BTD))
    else:
      y_BTD = self.ffn(self.ffn_norm(x_BTD))
    return x_BTD + (self.post_ffn_norm(y_BTD) if self.post_norms else y_BTD), extras


class Transformer(nnx.Module):
  """Decoder-only language model. `__call__(tokens_BT)` returns float32 logits_BTV and an extras dict.

  extras: `aux_loss` (lb_loss_weight * lb_loss + z_loss_weight * z_loss, already weighted; no lb_loss term with
  balance='bias'), the per-layer
  means `lb_loss`, `z_loss`, `drop_fraction`, `router_entropy` over MoE layers (zeros for a dense model), and
  `moe_layers`: one dict per MoE layer with its `expert_load` [E], `drop_fraction`, `router_entropy`,
  `lb_loss`, `z_loss`. Losses are averaged over MoE layers so their weights do not depend on depth.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # GPT-2 style std 0.02: tied logits start O(1) whatever d_model is.
    self.embed_VD = make_param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg.param_dtype,
                               role='tied_embedding' if cfg.tie_embeddings else 'embedding', std=0.02)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.final_norm = Norm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head_DV = make_param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.param_dtype,
                                   role='lm_head')
    if cfg.lm_head_bias:
      self.b_lm_head_V = make_param(rngs, (cfg.vocab_size,), ('vocab',), cfg.param_dtype, role='lm_head_bias',
                                     init='zeros')

  def embed(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dtype_of(self.cfg.dtype))
    return x_BTD * jnp.asarray(self.cfg.d_model ** 0.5, x_BTD.dtype) if self.cfg.embed_scale else x_BTD

  def __call__(self, tokens_BT: jax.Array) -> tuple[jax.Array, dict]:
    return self.forward_embeddings(self.embed(tokens_BT))

  def forward_embeddings(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
    """The model after the embedding lookup (lets tests differentiate with respect to input embeddings)."""
    cfg = self.cfg
    T = x_BTD.shape[1]
    if T > cfg.max_seq_len:
      raise ValueError(f'sequence length {T} exceeds max_seq_len={cfg.max_seq_len}')
    cos_TR, sin_TR = rope_tables(T, cfg.rope_size, cfg.rope_theta, cfg)
    layer_extras = []
    for block in self.blocks:
      x_BTD, extras = block(x_BTD, cos_TR, sin_TR)
      if extras is not None:
        layer_extras.append(extras)
    return self.head(x_BTD), summarize_extras(cfg, layer_extras)

  def cached_forward(self, tokens_BT: jax.Array, caches: tuple, start, last_only: bool = False
                     ) -> tuple[jax.Array, tuple]:
    """Logits of T new tokens at positions start.. and the layers' caches with them written in (inference; see
    slmjax/generate.py). `start` the Python int 0 is a prefill (attention over the new tokens, the arithmetic of
    `__call__`); a traced position is a decode step over the cache. `last_only`: logits of the last position
    only (all a prefill needs to sample from). No router extras: nothing is trained."""
    cfg = self.cfg
    x_BTD = self.embed(tokens_BT)
    T = x_BTD.shape[1]
    if isinstance(start, int) and start + T > caches[0][0].shape[1]:
      raise ValueError(f'{start + T} positions do not fit a cache of {caches[0][0].shape[1]}')
    # The rotary context is the cache's length (longrope picks its factors by it), prefill and decode alike.
    cos_TR, sin_TR = rope_at(start + jnp.arange(T), cfg.rope_size, cfg.rope_theta, cfg, caches[0][0].shape[1])
    new_caches = []
    for block, cache in zip(self.blocks, caches, strict=True):
      x_BTD, cache = block.cached(x_BTD, cos_TR, sin_TR, cache, start)
      new_caches.append(cache)
    return self.head(x_BTD[:, -1:] if last_only else x_BTD), tuple(new_caches)

  def head(self, x_BTD: jax.Array) -> jax.Array:
    """Final norm and the (tied or untied) output projection: float32 logits_BTV."""
    cfg = self.cfg
    x_BTD = self.final_norm(x_BTD)
    dt = dtype_of(cfg.dtype)
    if cfg.tie_embeddings:
      logits_BTV = linear(x_BTD, self.embed_VD[...].astype(dt).T)
    else:
      logits_BTV = linear(x_BTD, self.lm_head_DV[...].astype(dt))
    if cfg.lm_head_bias:
      logits_BTV = logits_BTV + self.b_lm_head_V[...].astype(dt)
    return softcap(logits_BTV.astype(jnp.float32), cfg.logit_softcap)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple:
  """Empty inference caches of every layer for `batch` sequences of up to `length` positions, in the compute
  dtype: keys and values (GQA) or latents (MLA)."""
  kind = LatentCache if cfg.attention == 'mla' else KVCache
  return tuple(kind.empty(cfg, batch, length) for _ in range(cfg.n_layers))


def summarize_extras(cfg: ModelConfig, layer_extras: list[dict]) -> dict:
  """Average the per-layer router metrics and weight the auxiliary losses."""
  zero = jnp.zeros((), jnp.float32)
  means = {k: (jnp.mean(jnp.stack([e[k] for e in layer_extras])) if layer_extras else zero) for k in MOE_METRICS}
  # A term of weight 0 stays out of the loss (reported, not differentiated: XLA keeps a product by 0.0 and its
  # backward, since 0 * inf is nan).
  weighted = [w * means[k] for w, k in ((cfg.lb_loss_scale, 'lb_loss'), (cfg.z_loss_weight, 'z_loss')) if w]
  aux = sum(weighted, zero)
  return {'aux_loss': aux, **means, 'moe_layers': layer_extras}


def balanced_router_biases(model: Transformer, extras: dict) -> nnx.State:
  """The model's selection biases after one auxiliary-loss-free balancing step from a forward pass's expert
  loads (their `moe_layers` come in block order), as a State to merge over the model's; empty unless
  `cfg.moves_selection_bias`. Pure: the model is read, not changed (the jitted train step merges the result
  after the optimizer update)."""
  cfg = model.cfg
  if not cfg.moves_selection_bias:
    return nnx.State({})
  biases = nnx.state(model, SelectionBias)
  moe_blocks = [i for i, block in enumerate(model.blocks) if block.is_moe]
  for i, layer in zip(moe_blocks, extras['moe_layers'], strict=True):
    bias = biases['blocks'][i]['ffn']['b_select_E']
    biases['blocks'][i]['ffn']['b_select_E'] = bias.replace(
        balance_selection_bias(bias[...], layer['expert_load'], cfg.bias_update_rate))
  return biases


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed))


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves: its full parameter tree, no memory allocated. Read-only: cached per
  config, as counting, sharding and conversion each read it (count.py --preset=all traced every preset's tree 6
  times, 28 s before its first line here; tracing is 0.1-0.5 s a model).

  Built without random draws (`rngs=None`): under tracing each draw updates the Rngs counter, and flax's check
  of that update walks the whole trace, so a 61-layer DeepSeek-V3 would take tens of seconds instead of one.
  """
  return nnx.eval_shape(lambda: Transformer(cfg, None))
