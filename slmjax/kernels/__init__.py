"""Matmul kernels, each behind a pure-JAX fallback: acc32.py (bf16 products accumulated in f32 inside XLA's dot,
forward and backward), mkl.py (oneMKL GEMMs through an XLA FFI custom call)."""
