"""Building blocks shared by dense and MoE models: norms, rotary embeddings, attention, the dense FFN.

Dimension letters used in tensor names (nanodo style):
  B batch, T query time, S key time, D d_model, N query heads, K kv heads, G query heads per kv head (N = K * G),
  H head_dim, U value head width, F ffn width, V vocab.
Parameters carry logical axis names (`out_sharding` metadata) that `slmjax.sharding` maps onto a device mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from slmjax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...], dtype: str,
               fan_in: int | None = None, init: str = 'normal', std: float | None = None) -> nnx.Param:
  """A parameter initialised with truncated-normal std (default 1/sqrt(fan_in)), ones or zeros.

  `names` are the logical axis names of the parameter's dimensions; `fan_in` defaults to shape[0].
  `rngs=None` builds zeros instead of random draws: shapes only, for `abstract_model`.
  """
  if init == 'ones':
    value = jnp.ones(shape, dtype_of(dtype))
  elif init == 'zeros' or rngs is None:
    value = jnp.zeros(shape, dtype_of(dtype))
  else:
    std = std if std is not None else (fan_in if fan_in is not None else shape[0]) ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype_of(dtype))
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias) over the last axis, statistics in float32.

  The parameters are named `scale_D` / `bias_D` whatever the normalised width is (counting finds norms by name).
  """

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.kind, self.eps = cfg.norm, cfg.norm_eps
    self.scale_D = make_param(rngs, (dim,), ('norm',), cfg.param_dtype, init='ones')
    if cfg.norm == 'layernorm':
      self.bias_D = make_param(rngs, (dim,), ('norm',), cfg.param_dtype, init='zeros')

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x32_BTD = x_BTD.astype(jnp.float32)
    if self.kind == 'layernorm':
      x32_BTD = x32_BTD - x32_BTD.mean(-1, keepdims=True)
    y_BTD = x32_BTD * jax.lax.rsqrt(jnp.mean(x32_BTD * x32_BTD, -1, keepdims=True) + self.eps)
    y_BTD = y_BTD * self.scale_D[...].astype(jnp.float32)
    if self.kind == 'layernorm':
      y_BTD = y_BTD + self.bias_D[...].astype(jnp.float32)
    return y_BTD.astype(x_BTD.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin of shape [T, H/2] for rotary embeddings (Su et al. 2021), half-split layout as in Llama."""
  inv_freq = theta ** -(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles_TH), jnp.sin(angles_TH)


def apply_rope(x_BTNH: jax.Array, cos_TH: jax.Array, sin_TH: jax.Array) -> jax.Array:
  """Rotate pairs (x[i], x[i + H/2]) by the position angle; computed in float32.

  Written as x * [cos, cos] + swap_halves(x) * [-sin, sin], the swap a reversed axis of size 2: XLA:CPU fuses
  that into one elementwise loop, where the concatenate of the textbook form was a slow fusion of its own
  (a 16 x 256 llama training step: 795 -> 769 ms, measured).
  """
  H = x_BTNH.shape[-1]
  x32_BTNH = x_BTNH.astype(jnp.float32)
  swapped_BTNH = x32_BTNH.reshape(*x_BTNH.shape[:-1], 2, H // 2)[..., ::-1, :].reshape(x_BTNH.shape)
  cos_1T1H = jnp.concatenate([cos_TH, cos_TH], axis=-1)[None, :, None, :]
  sin_1T1H = jnp.concatenate([-sin_TH, sin_TH], axis=-1)[None, :, None, :]
  return (x32_BTNH * cos_1T1H + swapped_BTNH * sin_1T1H).astype(x_BTNH.dtype)


def linear(x_BTI: jax.Array, w_I_O: jax.Array, n_in: int = 1) -> jax.Array:
  """Contract the last `n_in` axes of x with the first `n_in` axes of w, as one 2-D matmul on flattened rows.

  Same result as the einsum, but XLA:CPU differentiates a [B, T, I] einsum through transposed copies of the
  activations and slower matmuls; flat [B*T, I] @ [I, O] rows make a dense FFN's forward + backward 1.7x faster
  (142 vs 244 ms, 4096 tokens, d_model 256, d_ff 1024, measured). Reshapes of contiguous arrays are free.
  """
  lead, in_shape, out_shape = x_BTI.shape[:-n_in], w_I_O.shape[:n_in], w_I_O.shape[n_in:]
  if x_BTI.shape[-n_in:] != in_shape:
    raise ValueError(f'linear: input axes {x_BTI.shape[-n_in:]} do not match weight axes {in_shape}')
  size = math.prod(in_shape)
  y_XO = x_BTI.reshape(-1, size) @ w_I_O.reshape(size, -1)
  return y_XO.reshape(*lead, *out_shape)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap) (Gemma 2); cap 0 leaves x unchanged."""
  return cap * jnp.tanh(x / cap) if cap else x


QUERY_BLOCKS = 4  # causal attention runs in this many query blocks, each against its key prefix only


def causal_attention(q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKU: jax.Array, cap: float = 0.0) -> jax.Array:
  """softmax(q k^T / sqrt(H) + causal mask) v, logits and softmax in float32; returns out_BTKGU.

  G query heads share each of the K key/value heads (G = 1 is plain multi-head attention); U is the value width.
  Two speed choices, measured on CPU (16 x 256 tokens, 4 heads of 64, forward + backward of one layer):
  heads-major [B, K, G, T, H] operands, so each score and value product is one batched matmul with no
  transposed copies inside the gradient (83 -> 59 ms); and QUERY_BLOCKS query blocks, block i computing scores
  against keys [0, (i + 1) T / QUERY_BLOCKS) only, which skips 3/8 of the masked upper triangle (59 -> 42 ms).
  """
  T, H = q_BTKGH.shape[1], q_BTKGH.shape[-1]
  q_BKGTH = jnp.transpose(q_BTKGH, (0, 2, 3, 1, 4))
  k_BKSH = jnp.transpose(k_BSKH, (0, 2, 1, 3))
  v_BKSU = jnp.transpose(v_BSKU, (0, 2, 1, 3))
  blocks = QUERY_BLOCKS if T % QUERY_BLOCKS == 0 and T >= 16 * QUERY_BLOCKS else 1
  Q = T // blocks
  outs = []
  for i in range(blocks):
    end = (i + 1) * Q  # query block i sees keys [0, end)
    logits_BKGQS = jnp.einsum('BKGQH,BKSH->BKGQS', q_BKGTH[:, :, :, i * Q:end], k_BKSH[:, :, :end])
    logits_BKGQS = softcap(logits_BKGQS.astype(jnp.float32) * H ** -0.5, cap)
    causal_QS = jnp.arange(end)[None, :] <= jnp.arange(i * Q, end)[:, None]
    logits_BKGQS = jnp.where(causal_QS, logits_BKGQS, jnp.finfo(jnp.float32).min)
    probs_BKGQS = jax.nn.softmax(logits_BKGQS, axis=-1).astype(v_BSKU.dtype)
    outs.append(jnp.einsum('BKGQS,BKSU->BKGQU', probs_BKGQS, v_BKSU[:, :, :end]))
  out_BKGTU = jnp.concatenate(outs, axis=3)
  return jnp.transpose(out_BKGTU, (0, 3, 1, 2, 4))


class Attention(nnx.Module):
  """Causal attention with rotary embeddings and grouped-query attention (K kv heads).

  Options: biases on q/k/v (`qkv_bias`) and on the output (`o_bias`); QK-norm before rotary, either per head
  (`qk_norm='head'`, one gain vector of size H shared by the heads, Qwen3) or over the whole projection
  (`'full'`, gains of size N*H and K*H, OLMoE); tanh soft-capping of the logits (`attn_softcap`, Gemma 2).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    self.cfg = cfg
    self.w_q_DNH = make_param(rngs, (D, N, H), ('embed', 'q_heads', 'head_dim'), cfg.param_dtype, fan_in=D)
    self.w_k_DKH = make_param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), cfg.param_dtype, fan_in=D)
    self.w_v_DKH = make_param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), cfg.param_dtype, fan_in=D)
    self.w_o_NHD = make_param(rngs, (N, H, D), ('q_heads', 'head_dim', 'embed'), cfg.param_dtype, fan_in=N * H)
    if cfg.qkv_bias:
      self.b_q_NH = make_param(rngs, (N, H), ('q_heads', 'head_dim'), cfg.param_dtype, init='zeros')
      self.b_k_KH = make_param(rngs, (K, H), ('kv_heads', 'head_dim'), cfg.param_dtype, init='zeros')
      self.b_v_KH = make_param(rngs, (K, H), ('kv_heads', 'head_dim'), cfg.param_dtype, init='zeros')
    if cfg.o_bias:
      self.b_o_D = make_param(rngs, (D,), ('embed',), cfg.param_dtype, init='zeros')
    if cfg.qk_norm == 'head':
      self.q_norm, self.k_norm = Norm(H, cfg, rngs), Norm(H, cfg, rngs)
    elif cfg.qk_norm == 'full':
      self.q_norm, self.k_norm = Norm(N * H, cfg, rngs), Norm(K * H, cfg, rngs)

  def __call__(self, x_BTD: jax.Array, cos_TH: jax.Array, sin_TH: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    B, T, _ = x_BTD.shape
    N, K, G, H = cfg.n_heads, cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
    q_BTNH = linear(x_BTD, self.w_q_DNH[...].astype(dt))
    k_BSKH = linear(x_BTD, self.w_k_DKH[...].astype(dt))
    v_BSKH = linear(x_BTD, self.w_v_DKH[...].astype(dt))
    if cfg.qkv_bias:
      q_BTNH = q_BTNH + self.b_q_NH[...].astype(dt)
      k_BSKH = k_BSKH + self.b_k_KH[...].astype(dt)
      v_BSKH = v_BSKH + self.b_v_KH[...].astype(dt)
    if cfg.qk_norm == 'head':
      q_BTNH, k_BSKH = self.q_norm(q_BTNH), self.k_norm(k_BSKH)
    elif cfg.qk_norm == 'full':
      q_BTNH = self.q_norm(q_BTNH.reshape(B, T, N * H)).reshape(B, T, N, H)
      k_BSKH = self.k_norm(k_BSKH.reshape(B, T, K * H)).reshape(B, T, K, H)
    q_BTNH = apply_rope(q_BTNH, cos_TH, sin_TH)
    k_BSKH = apply_rope(k_BSKH, cos_TH, sin_TH)
    out_BTKGH = causal_attention(q_BTNH.reshape(B, T, K, G, H), k_BSKH, v_BSKH, cfg.attn_softcap)
    y_BTD = linear(out_BTKGH.reshape(B, T, N, H), self.w_o_NHD[...].astype(dt), n_in=2)
    if cfg.o_bias:
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
  """Position-wise feed-forward block of width `d_ff`: gated (SwiGLU/GeGLU, three matrices) or GELU (two)."""

  def __init__(self, cfg: ModelConfig, d_ff: int, rngs: nnx.Rngs):
    D, F = cfg.d_model, d_ff
    self.cfg = cfg
    if is_gated(cfg.activation):
      self.w_gate_DF = make_param(rngs, (D, F), ('embed', 'mlp'), cfg.param_dtype)
    self.w_up_DF = make_param(rngs, (D, F), ('embed', 'mlp'), cfg.param_dtype)
    self.w_down_FD = make_param(rngs, (F, D), ('mlp', 'embed'), cfg.param_dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = dtype_of(self.cfg.dtype)
    up_BTF = linear(x_BTD, self.w_up_DF[...].astype(dt))
    gate_BTF = None
    if is_gated(self.cfg.activation):
      gate_BTF = linear(x_BTD, self.w_gate_DF[...].astype(dt))
    h_BTF = activate(gate_BTF, up_BTF, self.cfg.activation)
    return linear(h_BTF, self.w_down_FD[...].astype(dt))
