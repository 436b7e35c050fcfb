// XLA:CPU FFI handlers for 2-D matmuls in oneMKL: bf16 x bf16 -> f32 (cblas_gemm_bf16bf16f32, which runs on the
// CPU's bf16 matrix units where it has them: AMX, AVX512_BF16) and f32 x f32 -> f32 (cblas_sgemm).
// Built by slmjax/kernels/mkl.py at first use; libmkl_rt is dlopen-ed from the path Python passes to
// slmjax_mkl_init, so nothing links against MKL at build time.
// Shapes: c[M, N] = op(a) @ op(b), op(a) [M, K] (a stored [K, M] when transa), op(b) [K, N] (b stored [N, K]
// when transb), all row-major.
#include <dlfcn.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS_LAYOUT / CBLAS_TRANSPOSE (mkl_cblas.h)
template <typename T>
using GemmFn = void (*)(int, int, int, int, int, int, float, const T*, int, const T*, int, float, float*, int);
GemmFn<uint16_t> gemm_bf16 = nullptr;  // MKL_BF16 is an unsigned 16-bit integer holding the bf16 bits
GemmFn<float> sgemm = nullptr;

template <typename T, ffi::DataType D>
ffi::Error Gemm(GemmFn<T> fn, ffi::Buffer<D> a, ffi::Buffer<D> b, ffi::ResultBuffer<ffi::F32> c, int64_t transa,
                int64_t transb) {
  if (fn == nullptr) return ffi::Error::Internal("slmjax_mkl: slmjax_mkl_init was not called");
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("slmjax_mkl: operands must be 2-D");
  const int64_t m = transa ? da[1] : da[0], k = transa ? da[0] : da[1];
  const int64_t n = transb ? db[0] : db[1], kb = transb ? db[1] : db[0];
  if (k != kb) return ffi::Error::InvalidArgument("slmjax_mkl: contracting sizes differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  fn(kRowMajor, transa ? kTrans : kNoTrans, transb ? kTrans : kNoTrans, m, n, k, 1.0f,
     reinterpret_cast<const T*>(a.untyped_data()), da[1], reinterpret_cast<const T*>(b.untyped_data()), db[1],
     0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

ffi::Error GemmBf16(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                    int64_t transa, int64_t transb) {
  return Gemm<uint16_t, ffi::BF16>(gemm_bf16, a, b, c, transa, transb);
}

ffi::Error GemmF32(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, int64_t transa,
                   int64_t transb) {
  return Gemm<float, ffi::F32>(sgemm, a, b, c, transa, transb);
}

}  // namespace

// 0 on success; 1 when libmkl_rt does not load, 2 when it lacks a symbol.
extern "C" int slmjax_mkl_init(const char* libmkl_rt) {
  void* lib = dlopen(libmkl_rt, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 1;
  gemm_bf16 = reinterpret_cast<GemmFn<uint16_t>>(dlsym(lib, "cblas_gemm_bf16bf16f32"));
  sgemm = reinterpret_cast<GemmFn<float>>(dlsym(lib, "cblas_sgemm"));
  return gemm_bf16 != nullptr && sgemm != nullptr ? 0 : 2;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxMklGemmBf16, GemmBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transa")
                                  .Attr<int64_t>("transb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxMklGemmF32, GemmF32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transa")
                                  .Attr<int64_t>("transb"));
