"""The dropless SwiGLU expert FFN of narrow experts (f32; bf16 where the CPU has AVX512_BF16) as two XLA:CPU FFI
calls (slmjax/kernels/swiglu_ffn.py): `grouped_ffn`'s contract (rows x_XD[row_src_N] sorted by expert, sizes_E
each; the output in the sorted layout), forward and backward each one call instead of a loop of XLA ops per tile.

Why: at the cpu ladder's widths (d_model 32-128) `grouped_ffn`'s row tiles are mostly XLA's per-op cost (a
[512, 32] x [32, 64] product runs at a third of a large one's FLOP rate, plus a slice, a gather and writes per
tile), so a dropless MoE step took 1.4-1.7x the dense step at d_model 32; with many narrow experts (64 of 64 at
d_model 256) the tiles' small products made the layer 2.2-2.3x a dense FFN of the same FLOPs. Interleaved A/B
against the tiles (MoE / dense step or layer): the cpu ladder's dropless MoE 1.64 / 1.45 / 1.40 / 1.27 -> 1.17 /
1.16 / 1.19 / 1.21 with the first kernels; bench_moe's fine layer 2.28 -> 1.44, its coarse one (8 experts of 512)
1.11 -> 1.03; bench_train's mixtral-512 step 1110 -> 925 ms; mixtral-1024 (experts of 1024) a wash with the first
kernels, 0.83-0.88x with later ones (swiglu_ffn.MAX_WIDTH).

Shape letters: slmjax/shapes.py (here X source rows, A, E, D, F, N rows sorted by expert plus slack).
"""

from __future__ import annotations

import jax

from slmjax.dispatch.experts import ExpertWeights
from slmjax.dispatch.rows import sum_rows
from slmjax.kernels import swiglu_ffn as kernel


def runs(x_XD: jax.Array, w: ExpertWeights, activation: str, matmul: str) -> bool:
  """Whether the fused call takes this layer: SwiGLU, `matmul` 'auto' (ModelConfig.matmul: 'xla' keeps
  everything in XLA, a vendor GEMM keeps the tiles), and what the handlers take (`kernel.fits`: f32, or bf16 on
  bf16 dot units; widths multiples of 32 up to d_model 256 and expert width 512; one CPU device)."""
  D, F = w.w_up_EDF.shape[1:]
  return (matmul == 'auto' and activation == 'swiglu' and w.w_gate_EDF is not None
          and kernel.fits(D, F, x_XD, *w))


@jax.custom_vjp
def swiglu_ffn(x_XD: jax.Array, row_src_N: jax.Array, dest_XA: jax.Array, w: ExpertWeights, sizes_E: jax.Array):
  """Expert e's SwiGLU FFN on its run of sorted rows (`grouped_ffn`'s arguments, its activation fixed); rows past
  the runs come out zero."""
  return _fwd(x_XD, row_src_N, dest_XA, w, sizes_E)[0]


def _fwd(x_XD, row_src_N, dest_XA, w, sizes_E):
  y_ND, gate_NF, up_NF = kernel.forward(x_XD, row_src_N, sizes_E, *w)
  return y_ND, (x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF)


def _bwd(res, dy_ND):
  x_XD, row_src_N, dest_XA, w, sizes_E, gate_NF, up_NF = res
  dx_ND, *dw = kernel.backward(x_XD, row_src_N, sizes_E, *w, gate_NF, up_NF, dy_ND)
  return sum_rows((dx_ND,), dest_XA), None, None, ExpertWeights(*dw), None


swiglu_ffn.defvjp(_fwd, _bwd)
