"""Matmul kernels, each behind a pure-JAX fallback: acc32.py (bf16 products accumulated in f32 inside XLA's dot,
forward and backward), gemm.py (oneMKL or oneDNN GEMMs through an XLA FFI custom call)."""
