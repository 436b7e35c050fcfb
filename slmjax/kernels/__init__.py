"""Optional native kernels, each behind a pure-JAX fallback: mkl.py (oneMKL GEMMs through an XLA FFI custom call)."""
