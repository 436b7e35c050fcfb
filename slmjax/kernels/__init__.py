"""Kernels, each behind a pure-JAX fallback: acc32.py (bf16 products accumulated in f32 inside XLA's dot, forward
and backward), gemm.py (oneMKL or oneDNN GEMMs through an XLA FFI custom call; `build` and `register` compile and
register every handler library here), swiglu_ffn.py (SwiGLU FFNs, experts and dense, one call each way),
attention.py (causal attention, one call each way), gather_sum.py (the MoE combine's weighted row gather-sum),
router.py (the MoE router's product) and adamw.py (the AdamW step, one call a parameter), the last five sharing
products.h."""
