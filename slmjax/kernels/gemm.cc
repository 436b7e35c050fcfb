// XLA:CPU FFI handlers for 2-D matmuls in a vendor library: bf16 x bf16 -> f32 (on the CPU's bf16 matrix units
// where the library uses them: AMX, AVX512_BF16) and f32 x f32 -> f32. Two libraries, each with handlers of its
// own so both can run in one process: oneMKL (cblas_gemm_bf16bf16f32, cblas_sgemm) and oneDNN
// (dnnl_gemm_bf16bf16f32, dnnl_sgemm). Built by slmjax/kernels/gemm.py at first use; each library is dlopen-ed
// from the path Python passes to its init function, so nothing links against them at build time.
// Shapes: c[M, N] = op(a) @ op(b), op(a) [M, K] (a stored [K, M] when transa), op(b) [K, N] (b stored [N, K]
// when transb), all row-major.
#include <dlfcn.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One GEMM call, whatever the library: row-major, c = op(a) op(b); 0 on success, else the library's status.
template <typename T>
using Gemm = int (*)(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                     int64_t ldb, float* c, int64_t ldc);

// oneMKL's CBLAS (CBLAS_LAYOUT / CBLAS_TRANSPOSE from mkl_cblas.h; MKL_BF16 holds the bf16 bits in a uint16).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
template <typename T>
using CblasFn = void (*)(int, int, int, int, int, int, float, const T*, int, const T*, int, float, float*, int);
CblasFn<uint16_t> cblas_bf16 = nullptr;
CblasFn<float> cblas_f32 = nullptr;

// oneDNN's C API (row-major already; char transposes, int64 sizes; returns a dnnl_status_t, 0 = success).
template <typename T>
using DnnlFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const T*, int64_t, const T*, int64_t, float,
                       float*, int64_t);
DnnlFn<uint16_t> dnnl_bf16 = nullptr;
DnnlFn<float> dnnl_f32 = nullptr;

template <typename T, CblasFn<T>* fn>
int ViaCblas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
             float* c, int64_t ldc) {
  (*fn)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
  return 0;
}

template <typename T, DnnlFn<T>* fn>
int ViaDnnl(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
            float* c, int64_t ldc) {
  return (*fn)(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

// The FFI handler of one library's GEMM for one dtype: `fn` is the library's function pointer (null until its
// init), `gemm` the call through it.
template <typename T, ffi::DataType D, auto* fn, Gemm<T> gemm>
ffi::Error Handle(ffi::Buffer<D> a, ffi::Buffer<D> b, ffi::ResultBuffer<ffi::F32> c, int64_t transa,
                  int64_t transb) {
  if (*fn == nullptr) return ffi::Error::Internal("slmjax gemm: no such GEMM (init not called, or not on this CPU)");
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("slmjax gemm: operands must be 2-D");
  const int64_t m = transa ? da[1] : da[0], k = transa ? da[0] : da[1];
  const int64_t n = transb ? db[0] : db[1], kb = transb ? db[1] : db[0];
  if (k != kb) return ffi::Error::InvalidArgument("slmjax gemm: contracting sizes differ");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (gemm(transa, transb, m, n, k, reinterpret_cast<const T*>(a.untyped_data()), da[1],
           reinterpret_cast<const T*>(b.untyped_data()), db[1], c->typed_data(), n))
    return ffi::Error::Internal("slmjax gemm: the library's GEMM returned an error status");
  return ffi::Error::Success();
}

constexpr auto MklBf16 = Handle<uint16_t, ffi::BF16, &cblas_bf16, ViaCblas<uint16_t, &cblas_bf16>>;
constexpr auto MklF32 = Handle<float, ffi::F32, &cblas_f32, ViaCblas<float, &cblas_f32>>;
constexpr auto OnednnBf16 = Handle<uint16_t, ffi::BF16, &dnnl_bf16, ViaDnnl<uint16_t, &dnnl_bf16>>;
constexpr auto OnednnF32 = Handle<float, ffi::F32, &dnnl_f32, ViaDnnl<float, &dnnl_f32>>;

template <typename Bf16, typename F32>
int Init(const char* path, const char* bf16_name, const char* f32_name, Bf16* bf16, F32* f32) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 1;
  *bf16 = reinterpret_cast<Bf16>(dlsym(lib, bf16_name));
  *f32 = reinterpret_cast<F32>(dlsym(lib, f32_name));
  return *bf16 != nullptr && *f32 != nullptr ? 0 : 2;
}

}  // namespace

// 0 on success; 1 when the library does not load, 2 when it lacks a symbol; 3 (oneDNN) when its bf16 GEMM does
// not run on this CPU (oneDNN 3.2's answers "unimplemented" without AVX-512): the f32 GEMM still runs.
extern "C" int slmjax_mkl_init(const char* path) {
  return Init(path, "cblas_gemm_bf16bf16f32", "cblas_sgemm", &cblas_bf16, &cblas_f32);
}
extern "C" int slmjax_onednn_init(const char* path) {
  if (int status = Init(path, "dnnl_gemm_bf16bf16f32", "dnnl_sgemm", &dnnl_bf16, &dnnl_f32)) return status;
  const uint16_t one = 0x3f80;  // 1.0 in bf16: a 1 x 1 x 1 product to ask whether the bf16 GEMM runs here
  float c = 0.0f;
  if (dnnl_bf16('N', 'N', 1, 1, 1, 1.0f, &one, 1, &one, 1, 0.0f, &c, 1) == 0 && c == 1.0f) return 0;
  dnnl_bf16 = nullptr;
  return 3;
}

#define SLMJAX_GEMM_HANDLER(symbol, fn, type)                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                                         \
                                ffi::Ffi::Bind()                                                    \
                                    .Arg<ffi::Buffer<type>>()                                       \
                                    .Arg<ffi::Buffer<type>>()                                       \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                   \
                                    .Attr<int64_t>("transa")                                        \
                                    .Attr<int64_t>("transb"));
SLMJAX_GEMM_HANDLER(SlmjaxMklGemmBf16, MklBf16, ffi::BF16)
SLMJAX_GEMM_HANDLER(SlmjaxMklGemmF32, MklF32, ffi::F32)
SLMJAX_GEMM_HANDLER(SlmjaxOnednnGemmBf16, OnednnBf16, ffi::BF16)
SLMJAX_GEMM_HANDLER(SlmjaxOnednnGemmF32, OnednnF32, ffi::F32)
