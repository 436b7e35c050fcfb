"""Causal softmax attention over query blocks, with a hand-written backward.

Shapes (slmjax/shapes.py): B batch, K key/value heads, Q query heads per key head, T query positions, U key
positions, Z query/key width, Y value width; heads-major [B, K, Q, T, Z] operands, so each product is one
batched matmul with no transposed copies.

Query block i (its T axis: `size` positions) scores against keys [0, end_i) only, skipping 3/8 of the masked
upper triangle with 4 blocks. Autodiff of that form pads each block's key and query cotangents to full length
and sums them, and in bf16 each of those adds is a round trip through f32 (155 ms of an 886 ms llama bf16
step, profiled). The backward here writes the query cotangent as one concatenation of its blocks and sums the
key/value cotangents of the prefixes in f32, cast once at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from slmjax.kernels import attention as attention_call

QUERY_BLOCKS = 4  # causal attention runs in this many query blocks, each against its key prefix only


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap) (Gemma 2); cap 0 leaves x unchanged."""
  return cap * jnp.tanh(x / cap) if cap else x


def visible(positions_T: jax.Array, keys: int, window: int = 0) -> jax.Array:
  """visible_TU: whether the query at each position sees key slot u < keys (causal; within `window` if > 0)."""
  u_1U, t_T1 = jnp.arange(keys)[None, :], positions_T[:, None]
  return (u_1U <= t_T1) & (u_1U > t_T1 - window) if window else u_1U <= t_T1


def _f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum with f32 accumulation and an f32 result (bf16 operands run on bf16 dot units)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _block_probs(q_BKQtZ, k_BKeZ, start: int, cap: float, scale: float, window: int):
  """f32 probabilities of one query block over its key prefix, and the soft-cap's tanh (None without a cap)."""
  raw_BKQte = _f32('BKQTZ,BKUZ->BKQTU', q_BKQtZ, k_BKeZ) * scale
  tanh_BKQte = jnp.tanh(raw_BKQte / cap) if cap else None
  logits_BKQte = cap * tanh_BKQte if cap else raw_BKQte
  mask_te = visible(jnp.arange(start, start + q_BKQtZ.shape[3]), k_BKeZ.shape[2], window)
  logits_BKQte = jnp.where(mask_te, logits_BKQte, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BKQte, axis=-1), tanh_BKQte


def _spans(T: int, blocks: int) -> list[tuple[int, int]]:
  size = T // blocks
  return [(i * size, (i + 1) * size) for i in range(blocks)]


def _forward(q_BKQTZ, k_BKUZ, v_BKUY, cap, scale, window, blocks):
  outs, residuals = [], []
  for start, end in _spans(q_BKQTZ.shape[3], blocks):
    probs_BKQte, tanh_BKQte = _block_probs(q_BKQTZ[:, :, :, start:end], k_BKUZ[:, :, :end], start, cap, scale,
                                           window)
    out_BKQtY = _f32('BKQTU,BKUY->BKQTY', probs_BKQte.astype(v_BKUY.dtype), v_BKUY[:, :, :end])
    outs.append(out_BKQtY.astype(v_BKUY.dtype))
    residuals.append((probs_BKQte, tanh_BKQte))
  return jnp.concatenate(outs, axis=3), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q_BKQTZ, k_BKUZ, v_BKUY, cap, scale, window, blocks):
  return _forward(q_BKQTZ, k_BKUZ, v_BKUY, cap, scale, window, blocks)[0]


def _attention_fwd(q_BKQTZ, k_BKUZ, v_BKUY, cap, scale, window, blocks):
  out_BKQTY, residuals = _forward(q_BKQTZ, k_BKUZ, v_BKUY, cap, scale, window, blocks)
  return out_BKQTY, (q_BKQTZ, k_BKUZ, v_BKUY, out_BKQTY, residuals)


def _attention_bwd(cap, scale, window, blocks, saved, dout_BKQTY):
  """Softmax's backward per block: dlogits = P * (dP - rowsum(dout * out)); masked entries have P = 0."""
  q_BKQTZ, k_BKUZ, v_BKUY, out_BKQTY, residuals = saved
  U = k_BKUZ.shape[2]
  dout_BKQTY = dout_BKQTY.astype(v_BKUY.dtype)
  rowsum_BKQT1 = jnp.sum(dout_BKQTY.astype(jnp.float32) * out_BKQTY.astype(jnp.float32), -1, keepdims=True)
  dq_blocks, dk_BKUZ, dv_BKUY = [], 0.0, 0.0
  for (start, end), (probs_BKQte, tanh_BKQte) in zip(_spans(q_BKQTZ.shape[3], blocks), residuals):
    dout_BKQtY = dout_BKQTY[:, :, :, start:end]
    dprobs_BKQte = _f32('BKQTY,BKUY->BKQTU', dout_BKQtY, v_BKUY[:, :, :end])
    dlogits_BKQte = probs_BKQte * (dprobs_BKQte - rowsum_BKQT1[:, :, :, start:end])
    if cap:
      dlogits_BKQte = dlogits_BKQte * (1 - tanh_BKQte * tanh_BKQte)
    draw_BKQte = (dlogits_BKQte * scale).astype(q_BKQTZ.dtype)
    dq_blocks.append(_f32('BKQTU,BKUZ->BKQTZ', draw_BKQte, k_BKUZ[:, :, :end]).astype(q_BKQTZ.dtype))
    pad = ((0, 0), (0, 0), (0, U - end), (0, 0))
    dk_BKUZ = dk_BKUZ + jnp.pad(_f32('BKQTU,BKQTZ->BKUZ', draw_BKQte, q_BKQTZ[:, :, :, start:end]), pad)
    dv_BKUY = dv_BKUY + jnp.pad(_f32('BKQTU,BKQTY->BKUY', probs_BKQte.astype(v_BKUY.dtype), dout_BKQtY), pad)
  return (jnp.concatenate(dq_blocks, axis=3), dk_BKUZ.astype(k_BKUZ.dtype), dv_BKUY.astype(v_BKUY.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_BTKQZ: jax.Array, k_BUKZ: jax.Array, v_BUKY: jax.Array, cap: float = 0.0, *,
                     scale: float | None = None, window: int = 0, matmul: str = 'auto') -> jax.Array:
  """softmax(q k^T / sqrt(Z) + causal mask) v, logits and softmax in float32; returns out_BTKQY.

  `scale` replaces 1 / sqrt(Z) (Gemma 2's query_pre_attn_scalar); `window` > 0 masks keys `window` or more
  positions back (sliding-window attention: a query sees itself and the window - 1 keys before it).

  Q query heads share each of the K key/value heads (Q = 1 is plain multi-head attention); Y is the value width (Z in
  GQA). With `matmul` 'auto' (ModelConfig.matmul) on one CPU device, without soft-cap or window, at positions and head
  widths in multiples of 32, it runs as one call each way (slmjax/kernels/attention.py: 16 x 256 tokens, 4 heads of
  64, forward + backward of one layer 40 -> 14 ms in f32, 28-33 -> 16 ms in bf16). Otherwise XLA's ops, measured on
  CPU at that shape: heads-major operands (83 -> 59 ms) and QUERY_BLOCKS query blocks (59 -> 42 ms); the backward:
  module docstring.
  """
  T, Z = q_BTKQZ.shape[1], q_BTKQZ.shape[-1]
  scale = Z ** -0.5 if scale is None else scale
  if attention_call.fits(q_BTKQZ, k_BUKZ, v_BUKY, cap, window, matmul):
    return attention_call.attention(q_BTKQZ, k_BUKZ, v_BUKY, float(scale))
  blocks = QUERY_BLOCKS if T % QUERY_BLOCKS == 0 and T >= 16 * QUERY_BLOCKS else 1
  out_BKQTY = _attention(jnp.transpose(q_BTKQZ, (0, 2, 3, 1, 4)), jnp.transpose(k_BUKZ, (0, 2, 1, 3)),
                         jnp.transpose(v_BUKY, (0, 2, 1, 3)), float(cap), float(scale), int(window), blocks)
  return jnp.transpose(out_BKQTY, (0, 3, 1, 2, 4))
