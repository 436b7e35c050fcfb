"""Building blocks shared by dense and MoE models: norms, rotary embeddings, attention, the dense FFN.

Shape letters: slmjax/shapes.py (here B, T, U, D, H, K, Q, Z, Y, R, F, N).
Parameters carry logical axis names (`out_sharding` metadata) that `slmjax.axes` maps onto a device mesh, and
a `role` (metadata too) that says how `slmjax.counting` counts them, whatever the attribute is called.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.attention_core import causal_attention, softcap, visible
from slmjax.config import ModelConfig
from slmjax.kernels import acc32, gemm, swiglu_ffn


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...], dtype: str, *, role: str,
               fan_in: int | None = None, init: str = 'normal', std: float | None = None) -> nnx.Param:
  """A parameter initialised with truncated-normal std (default 1/sqrt(fan_in)), ones or zeros.

  `names` are the logical axis names of the parameter's dimensions; `role` is what the parameter is for counting
  (one of `slmjax.counting.ROLES`); `fan_in` defaults to shape[0].
  `rngs=None` builds zeros instead of random draws: shapes only, for `abstract_model`.
  """
  if init == 'ones':
    value = jnp.ones(shape, dtype_of(dtype))
  elif init == 'zeros' or rngs is None:
    value = jnp.zeros(shape, dtype_of(dtype))
  else:
    std = std if std is not None else (fan_in if fan_in is not None else shape[0]) ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype_of(dtype))
  return nnx.Param(value, out_sharding=names, eager_sharding=False, role=role)


class Norm(nnx.Module):
  """RMSNorm (`scale` only) or LayerNorm (`scale` and `bias`) over the last axis, statistics in float32.

  The parameters have the width of what they normalise (D, Z, H * Z, I or J), so their names carry no shape
  letters (flax's own names); `role` is 'norm' for a block's norms, 'attention_norm' for those inside attention.
  With `cfg.norm_plus_one` the gain is stored zero-centred and applied as (1 + scale), in float32 (Gemma's
  convention, kept so that its checkpoints convert bit for bit).
  """

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, role: str = 'norm'):
    self.kind, self.eps, self.plus_one = cfg.norm, cfg.norm_eps, cfg.norm_plus_one
    self.scale = make_param(rngs, (dim,), ('norm',), cfg.param_dtype, role=role,
                            init='zeros' if cfg.norm_plus_one else 'ones')
    if cfg.norm == 'layernorm':
      self.bias = make_param(rngs, (dim,), ('norm',), cfg.param_dtype, role=role, init='zeros')

  def __call__(self, x: jax.Array) -> jax.Array:
    """x of any leading axes, the normalised width last."""
    x32 = x.astype(jnp.float32)
    if self.kind == 'layernorm':
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    y = y * (1.0 + scale if self.plus_one else scale)
    if self.kind == 'layernorm':
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def rope_tables(seq_len: int, rope_dim: int, theta: float, cfg: ModelConfig | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """cos_TR and sin_TR, R = rope_dim / 2 columns, for rotary embeddings (Su et al. 2021), half-split as in Llama.

  (The tables' R is half the rotary width of a head: each column rotates one pair.) `cfg` brings its
  `rope_scaling` (none without it); the context is seq_len long.
  """
  return rope_at(jnp.arange(seq_len, dtype=jnp.float32), rope_dim, theta, cfg, seq_len)


def rope_frequencies(rope_dim: int, theta: float, cfg: ModelConfig | None = None, context_len: int = 0
                     ) -> jax.Array:
  """The R inverse frequencies theta^(-2i / rope_dim), scaled as `cfg.rope_scaling` says: linear divides them
  all by rope_factor (position interpolation, Chen et al. 2023); llama3 (Llama 3.1,
  transformers' `_compute_llama3_parameters`) divides wavelengths longer than original_len / low_freq_factor by
  rope_factor, keeps those shorter than original_len / high_freq_factor and interpolates smoothly between;
  yarn (`yarn_frequencies`); longrope (Phi-3) divides frequency i by rope_short_factor[i], or by
  rope_long_factor[i] when the context (`context_len`: the forward's length, the cache's when decoding) is
  longer than rope_original_max_len."""
  inv_freq = theta ** -(jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim)
  if cfg is None or cfg.rope_scaling == 'none':
    return inv_freq
  if cfg.rope_scaling == 'linear':
    return inv_freq / cfg.rope_factor
  if cfg.rope_scaling == 'yarn':
    return yarn_frequencies(inv_freq, rope_dim, theta, cfg)
  if cfg.rope_scaling == 'longrope':
    long = context_len > cfg.rope_original_max_len
    return inv_freq / jnp.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, jnp.float32)
  factor, low, high, old = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                            cfg.rope_original_max_len)
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return jnp.where(medium, smoothed, scaled)


def yarn_frequencies(inv_freq: jax.Array, rope_dim: int, theta: float, cfg: ModelConfig) -> jax.Array:
  """YaRN (Peng et al. 2023; transformers' `_compute_yarn_parameters`): frequencies that turn fewer than
  rope_beta_slow times over the pre-training context are divided by rope_factor, those turning more than
  rope_beta_fast times are kept, and a linear ramp over the dimensions between blends the two."""
  def dimension_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times
    return rope_dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = dimension_of(cfg.rope_beta_fast), dimension_of(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rope_dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = jnp.clip((jnp.arange(rope_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)


def rope_at(positions_T: jax.Array, rope_dim: int, theta: float, cfg: ModelConfig | None = None,
            context_len: int = 0) -> tuple[jax.Array, jax.Array]:
  """cos_TR and sin_TR at the given positions (the rows of `rope_tables` there, for a context of context_len):
  a decode step's tables. yarn and longrope scale both by rope_attention_factor."""
  inv_freq = rope_frequencies(rope_dim, theta, cfg, context_len)
  angles_TR = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos_TR, sin_TR = jnp.cos(angles_TR), jnp.sin(angles_TR)
  if cfg is not None and cfg.rope_scaling in ('yarn', 'longrope') and cfg.rope_attention_factor != 1.0:
    cos_TR, sin_TR = cos_TR * cfg.rope_attention_factor, sin_TR * cfg.rope_attention_factor
  return cos_TR, sin_TR


def apply_rope(x_BTHR: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
  """Rotate pairs (x[i], x[i + R/2]) by the position angle; computed in float32.

  H is any heads axis (query heads, K key heads, or 1 for MLA's shared rotary key); R the rotary width.

  Written as x * [cos, cos] + swap_halves(x) * [-sin, sin], the swap a reversed axis of size 2: XLA:CPU fuses
  that into one elementwise loop, where the concatenate of the textbook form was a slow fusion of its own
  (a 16 x 256 llama training step: 795 -> 769 ms, measured).
  """
  R = x_BTHR.shape[-1]
  x32_BTHR = x_BTHR.astype(jnp.float32)
  swapped_BTHR = x32_BTHR.reshape(*x_BTHR.shape[:-1], 2, R // 2)[..., ::-1, :].reshape(x_BTHR.shape)
  cos_1T1R = jnp.concatenate([cos_TR, cos_TR], axis=-1)[None, :, None, :]
  sin_1T1R = jnp.concatenate([-sin_TR, sin_TR], axis=-1)[None, :, None, :]
  return (x32_BTHR * cos_1T1R + swapped_BTHR * sin_1T1R).astype(x_BTHR.dtype)


def linear(x: jax.Array, w: jax.Array, n_in: int = 1, matmul: str = 'auto') -> jax.Array:
  """Contract the last `n_in` axes of x with the first `n_in` axes of w, as one 2-D matmul on flattened rows
  (`matmul`: ModelConfig.matmul, 'mkl' or 'onednn' for a vendor GEMM through slmjax/kernels/gemm.py, 'auto' for
  oneDNN in the bf16 backward where it loads and pays; with XLA's dot, bf16 operands accumulate in f32, forward and
  backward, which XLA:CPU runs on bf16 dot units: slmjax/kernels/acc32.py).

  Same result as the einsum, but XLA:CPU differentiates a [B, T, D] einsum through transposed copies of the
  activations and slower matmuls; flat [B*T, D] @ [D, F] rows make a dense FFN's forward + backward 1.7x faster
  (142 vs 244 ms, 4096 tokens, d_model 256, d_ff 1024, measured). Reshapes of contiguous arrays are free.
  """
  lead, in_shape, out_shape = x.shape[:-n_in], w.shape[:n_in], w.shape[n_in:]
  if x.shape[-n_in:] != in_shape:
    raise ValueError(f'linear: input axes {x.shape[-n_in:]} do not match weight axes {in_shape}')
  size = math.prod(in_shape)
  x_MK, w_KN = x.reshape(-1, size), w.reshape(size, -1)
  y = acc32.matmul(x_MK, w_KN) if matmul == 'xla' else gemm.matmul(x_MK, w_KN, matmul)
  return y.reshape(*lead, *out_shape)


def cached_attention(q_BTKQZ: jax.Array, k_BUKZ: jax.Array, v_BUKY: jax.Array, start: jax.Array,
                     cap: float = 0.0, *, scale: float | None = None, window: int = 0) -> jax.Array:
  """Attention of T new queries at positions start.. over a KV cache of U slots (slots after a query's own
  position are masked: not yet written, or in its future); returns out_BTKQY. Same arithmetic as
  `causal_attention` (float32 logits, scale, soft-cap, mask, softmax), so cached decoding reproduces it."""
  T, U, Z = q_BTKQZ.shape[1], k_BUKZ.shape[1], q_BTKQZ.shape[-1]
  logits_BKQTU = jnp.einsum('BTKQZ,BUKZ->BKQTU', q_BTKQZ, k_BUKZ)
  logits_BKQTU = softcap(logits_BKQTU.astype(jnp.float32) * (Z ** -0.5 if scale is None else scale), cap)
  visible_TU = visible(start + jnp.arange(T), U, window)
  logits_BKQTU = jnp.where(visible_TU, logits_BKQTU, jnp.finfo(jnp.float32).min)
  probs_BKQTU = jax.nn.softmax(logits_BKQTU, axis=-1).astype(v_BUKY.dtype)
  return jnp.einsum('BKQTU,BUKY->BTKQY', probs_BKQTU, v_BUKY)


def write_cache(cache_BU: jax.Array, new_BT: jax.Array, start) -> jax.Array:
  """`cache_BU` (any trailing axes) with the T new rows written at positions start..start + T - 1."""
  index = (0, start) + (0,) * (cache_BU.ndim - 2)
  return jax.lax.dynamic_update_slice(cache_BU, new_BT.astype(cache_BU.dtype), index)


class KVCache(NamedTuple):
  """One GQA layer's inference cache: rotated keys and values of every position so far (U slots)."""
  k_BUKZ: jax.Array
  v_BUKZ: jax.Array

  @staticmethod
  def empty(cfg: ModelConfig, batch: int, length: int) -> 'KVCache':
    shape = (batch, length, cfg.kv_heads, cfg.head_size)
    return KVCache(jnp.zeros(shape, dtype_of(cfg.dtype)), jnp.zeros(shape, dtype_of(cfg.dtype)))


class Attention(nnx.Module):
  """Causal attention with rotary embeddings and grouped-query attention (K kv heads, Q = H / K query heads each).

  Options: biases on q/k/v (`qkv_bias`) and on the output (`o_bias`); QK-norm before rotary, either per head
  (`qk_norm='head'`, one gain vector of size Z shared by the heads, Qwen3) or over the whole projection
  (`'full'`, gains of size H*Z and K*Z, OLMoE); tanh soft-capping of the logits (`attn_softcap`, Gemma 2);
  logits scaled by query_pre_attn_scalar ** -0.5 (Gemma 2); a sliding `window` (this layer's `cfg.window`).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, window: int = 0):
    D, H, K, Z = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    p = cfg.param_dtype
    self.cfg, self.window = cfg, window
    self.scale = cfg.attention_scale
    self.w_q_DHZ = make_param(rngs, (D, H, Z), ('embed', 'q_heads', 'head_dim'), p, role='attention', fan_in=D)
    self.w_k_DKZ = make_param(rngs, (D, K, Z), ('embed', 'kv_heads', 'head_dim'), p, role='attention', fan_in=D)
    self.w_v_DKZ = make_param(rngs, (D, K, Z), ('embed', 'kv_heads', 'head_dim'), p, role='attention', fan_in=D)
    self.w_o_HZD = make_param(rngs, (H, Z, D), ('q_heads', 'head_dim', 'embed'), p, role='attention',
                              fan_in=H * Z)
    if cfg.qkv_bias:
      self.b_q_HZ = make_param(rngs, (H, Z), ('q_heads', 'head_dim'), p, role='attention_bias', init='zeros')
      self.b_k_KZ = make_param(rngs, (K, Z), ('kv_heads', 'head_dim'), p, role='attention_bias', init='zeros')
      self.b_v_KZ = make_param(rngs, (K, Z), ('kv_heads', 'head_dim'), p, role='attention_bias', init='zeros')
    if cfg.o_bias:
      self.b_o_D = make_param(rngs, (D,), ('embed',), p, role='attention_bias', init='zeros')
    if cfg.qk_norm == 'head':
      self.q_norm, self.k_norm = Norm(Z, cfg, rngs, 'attention_norm'), Norm(Z, cfg, rngs, 'attention_norm')
    elif cfg.qk_norm == 'full':
      self.q_norm = Norm(H * Z, cfg, rngs, 'attention_norm')
      self.k_norm = Norm(K * Z, cfg, rngs, 'attention_norm')

  def __call__(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    H, K, Q, Z = cfg.n_heads, cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
    q_BTHZ, k_BUKZ, v_BUKZ = self.project(x_BTD, cos_TR, sin_TR)
    out_BTKQZ = causal_attention(q_BTHZ.reshape(B, T, K, Q, Z), k_BUKZ, v_BUKZ, cfg.attn_softcap,
                                 scale=self.scale, window=self.window, matmul=cfg.matmul)
    return self.output(out_BTKQZ.reshape(B, T, H, Z))

  def cached(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array, cache: KVCache, start
             ) -> tuple[jax.Array, KVCache]:
    """Attention of T new positions start.. (the rows of cos_TR / sin_TR) that also writes their keys and
    values into `cache`. `start` the Python int 0 is a prefill: attention over the new keys alone, the exact
    arithmetic of `__call__`; otherwise (a traced position) over the cache."""
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    H, K, Q, Z = cfg.n_heads, cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
    q_BTHZ, k_BTKZ, v_BTKZ = self.project(x_BTD, cos_TR, sin_TR)
    cache = KVCache(write_cache(cache.k_BUKZ, k_BTKZ, start), write_cache(cache.v_BUKZ, v_BTKZ, start))
    q_BTKQZ = q_BTHZ.reshape(B, T, K, Q, Z)
    if isinstance(start, int) and start == 0:
      out_BTKQZ = causal_attention(q_BTKQZ, k_BTKZ, v_BTKZ, cfg.attn_softcap, scale=self.scale,
                                   window=self.window, matmul=cfg.matmul)
    else:
      out_BTKQZ = cached_attention(q_BTKQZ, cache.k_BUKZ, cache.v_BUKZ, start, cfg.attn_softcap,
                                   scale=self.scale, window=self.window)
    return self.output(out_BTKQZ.reshape(B, T, H, Z)), cache

  def project(self, x_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q_BTHZ, k_BUKZ, v_BUKZ) of the positions of x (U = T): projections, biases, QK-norm, rotary."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, T, _ = x_BTD.shape
    H, K, Z = cfg.n_heads, cfg.kv_heads, cfg.head_size
    q_BTHZ = linear(x_BTD, self.w_q_DHZ[...].astype(dt), matmul=cfg.matmul)
    k_BUKZ = linear(x_BTD, self.w_k_DKZ[...].astype(dt), matmul=cfg.matmul)  # keys at the same positions: U = T
    v_BUKZ = linear(x_BTD, self.w_v_DKZ[...].astype(dt), matmul=cfg.matmul)
    if cfg.qkv_bias:
      q_BTHZ = q_BTHZ + self.b_q_HZ[...].astype(dt)
      k_BUKZ = k_BUKZ + self.b_k_KZ[...].astype(dt)
      v_BUKZ = v_BUKZ + self.b_v_KZ[...].astype(dt)
    if cfg.qk_norm == 'head':
      q_BTHZ, k_BUKZ = self.q_norm(q_BTHZ), self.k_norm(k_BUKZ)
    elif cfg.qk_norm == 'full':
      q_BTHZ = self.q_norm(q_BTHZ.reshape(B, T, H * Z)).reshape(B, T, H, Z)
      k_BUKZ = self.k_norm(k_BUKZ.reshape(B, T, K * Z)).reshape(B, T, K, Z)
    return apply_rope(q_BTHZ, cos_TR, sin_TR), apply_rope(k_BUKZ, cos_TR, sin_TR), v_BUKZ

  def output(self, out_BTHZ: jax.Array) -> jax.Array:
    """The output projection (and its bias) of the heads' attention outputs."""
    dt = dtype_of(self.cfg.dtype)
    y_BTD = linear(out_BTHZ, self.w_o_HZD[...].astype(dt), n_in=2, matmul=self.cfg.matmul)
    if self.cfg.o_bias:
      y_BTD = y_BTD + self.b_o_D[...].astype(dt)
    return y_BTD


def activate(gate_F: jax.Array | None, up_F: jax.Array, activation: str) -> jax.Array:
  """SwiGLU = silu(gate) * up, GeGLU = gelu(gate) * up (Shazeer 2020); plain GELU ignores the gate."""
  if activation == 'swiglu':
    return jax.nn.silu(gate_F) * up_F
  if activation == 'geglu':
    return jax.nn.gelu(gate_F, approximate=True) * up_F
  return jax.nn.gelu(up_F, approximate=True)


def is_gated(activation: str) -> bool:
  return activation in ('swiglu', 'geglu')


class DenseFFN(nnx.Module):
  """Position-wise feed-forward block of width `d_ff`: gated (SwiGLU/GeGLU, three matrices) or GELU (two).

  `role` is 'dense_ffn', or 'shared_expert' for an MoE layer's always-on shared experts. A narrow SwiGLU FFN
  of 512+ rows on one CPU device runs as the fused calls of slmjax/kernels/swiglu_ffn.py (`dense_parts`).
  """

  def __init__(self, cfg: ModelConfig, d_ff: int, rngs: nnx.Rngs, role: str = 'dense_ffn'):
    D, F = cfg.d_model, d_ff
    self.cfg = cfg
    if is_gated(cfg.activation):
      self.w_gate_DF = make_param(rngs, (D, F), ('embed', 'mlp'), cfg.param_dtype, role=role)
    self.w_up_DF = make_param(rngs, (D, F), ('embed', 'mlp'), cfg.param_dtype, role=role)
    self.w_down_FD = make_param(rngs, (F, D), ('mlp', 'embed'), cfg.param_dtype, role=role)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = dtype_of(self.cfg.dtype)
    if self.cfg.activation == 'swiglu':
      x_MD = x_BTD.reshape(-1, x_BTD.shape[-1]).astype(dt)
      w = [a[...] for a in (self.w_gate_DF, self.w_up_DF, self.w_down_FD)]  # uncast: the calls round while packing
      if parts := swiglu_ffn.dense_parts(x_MD, *w, self.cfg.matmul):
        return swiglu_ffn.dense_ffn(x_MD, *w, parts).reshape(x_BTD.shape)
    up_BTF = linear(x_BTD, self.w_up_DF[...].astype(dt), matmul=self.cfg.matmul)
    gate_BTF = None
    if is_gated(self.cfg.activation):
      gate_BTF = linear(x_BTD, self.w_gate_DF[...].astype(dt), matmul=self.cfg.matmul)
    h_BTF = activate(gate_BTF, up_BTF, self.cfg.activation)
    return linear(h_BTF, self.w_down_FD[...].astype(dt), matmul=self.cfg.matmul)
