// The pieces slmjax's XLA:CPU FFI handlers share (swiglu_ffn.cc, attention.cc, gather_sum.cc, router.cc,
// adamw.cc): one register-blocked f32 product kernel, a transpose, exp on AVX-512 vectors, bf16 buffer access
// (scalar and on vectors), per-thread scratch, and tasks spread over XLA's intra-op threads (by item or by rows).
// Each handler file includes it once; slmjax/kernels/gemm.py's build keys its cache on this header too.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// bf16 as its 16 bits; a buffer's elements as the handlers compute on them (Data: f32 as float, bf16 as bf16).
typedef uint16_t bf16;
template <ffi::DataType DT>
using Elem = std::conditional_t<DT == ffi::DataType::F32, float, bf16>;
template <ffi::DataType DT>
const Elem<DT>* Data(const ffi::Buffer<DT>& b) { return reinterpret_cast<const Elem<DT>*>(b.typed_data()); }
template <ffi::DataType DT>
Elem<DT>* Data(ffi::ResultBuffer<DT>& b) { return reinterpret_cast<Elem<DT>*>(b->typed_data()); }

// L floats a vector (GCC vector extensions): one register. A type wider than the registers is kept in memory
// (AVX2 with 16 floats: the fused FFN ran 13x slower than XLA's dots on an AVX2-only EPYC).
#ifdef __AVX512F__
constexpr int L = 16;
constexpr int MR = 8;   // rows of the product kernel: MR x NB accumulators fill half the AVX-512 registers
constexpr int NB = 32;  // columns of the product kernel: widths must be multiples of it
#else
// AVX2's 16 registers of 8 floats: 4 x 16 accumulators take 8, leaving room for b's row and a's broadcast.
constexpr int L = 8;
constexpr int MR = 4;
constexpr int NB = 16;
#endif
typedef float V __attribute__((vector_size(4 * L)));
typedef int32_t VI __attribute__((vector_size(4 * L)));
typedef float VU __attribute__((vector_size(4 * L), aligned(4)));  // unaligned loads and stores

inline V Load(const float* p) { return *reinterpret_cast<const VU*>(p); }
inline void Store(float* p, V v) { *reinterpret_cast<VU*>(p) = v; }

// f32 or bf16 rows a vector at a time (gather_sum.cc, router.cc): bf16 widened and rounded on integer vectors.
typedef uint32_t VW __attribute__((vector_size(4 * L)));
typedef uint16_t VH __attribute__((vector_size(2 * L), aligned(2)));  // L bf16, unaligned

// L elements at p in f32.
inline V Widen(const float* p) { return Load(p); }
inline V Widen(const bf16* p) {
  return reinterpret_cast<V>(__builtin_convertvector(*reinterpret_cast<const VH*>(p), VW) << 16);
}

// L elements at p = v, rounded to bf16 to nearest even as XLA's convert (NaN stays NaN).
inline void Put(V v, float* p) { Store(p, v); }
inline void Put(V v, bf16* p) {
  const VW u = reinterpret_cast<VW>(v);
  const VW rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VW bits = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
  *reinterpret_cast<VH*>(p) = __builtin_convertvector(bits, VH);
}

// c[MR, NB] (+)= sum_k a(r, k) b[k, 0:NB] over K, a(r, k) = a[r * ar + k * ak]; b's rows ldb apart, c's ldc.
// The accumulators stay in registers across k (8 x 32 measured 112 GFLOP/s a core here, 4 x 64 of scalar loops
// the compiler vectorized 57-79).
__attribute__((always_inline)) inline void Kernel(const float* a, int64_t ar, int64_t ak, const float* b,
                                                  int64_t K, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int NV = NB / L;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? Load(c + r * ldc + L * j) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V bk[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) bk[j] = Load(b + k * ldb + L * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * ar + k * ak];
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[r][j] += av * bk[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) Store(c + r * ldc + L * j, acc[r][j]);
}

// c[M, N] (+)= a(m, k) b[K, N], a(m, k) = a[m * am + k * ak]: a's rows (am = K, ak = 1) or its transpose's
// (am = 1, ak = M, for weight gradients); M a multiple of MR, N of NB.
inline void Times(const float* a, int64_t am, int64_t ak, int64_t M, int64_t K, const float* b, int64_t N, float* c,
                  bool accumulate) {
  for (int64_t m = 0; m < M; m += MR)
    for (int64_t j = 0; j < N; j += NB) Kernel(a + m * am, am, ak, b + j, K, N, c + m * N + j, N, accumulate);
}

// c[M, N] (+)= a[M, K] b[K, N].
inline void RowsTimes(const float* a, int64_t M, int64_t K, const float* b, int64_t N, float* c, bool accumulate) {
  Times(a, K, 1, M, K, b, N, c, accumulate);
}

// c[M, N] += a[K, M]^T b[K, N]: a weight gradient's share of K rows.
inline void AddOuter(const float* a, int64_t K, int64_t M, const float* b, int64_t N, float* c) {
  Times(a, 1, M, M, K, b, N, c, true);
}

// t[C, R] = s[R, C]^T, in 16 x 16 blocks (a 256 x 512 f32 matrix 41 us here, 206 us row by row: the strided
// writes of a block stay in cache).
template <typename T>
inline void Transpose(const T* s, int64_t rows, int64_t cols, T* t) {
  constexpr int64_t BS = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += BS)
    for (int64_t c0 = 0; c0 < cols; c0 += BS)
      for (int64_t r = r0; r < std::min(r0 + BS, rows); ++r)
        for (int64_t c = c0; c < std::min(c0 + BS, cols); ++c) t[c * rows + r] = s[r * cols + c];
}

// Per-thread memory reused from task to task and call to call: a task's buffers come uninitialised (the handlers
// write before they read, and zero what they accumulate into) from blocks that stay with the thread. Zeroed
// std::vectors cost a task its buffers' size in stores and a malloc each (swiglu_ffn's backward: ~2 MB an expert
// a call).
class Scratch {
 public:
  // This thread's scratch, every buffer taken from it before released: call once at the start of a task.
  static Scratch& ForTask() {
    thread_local Scratch scratch;
    scratch.block_ = 0, scratch.used_ = 0;
    return scratch;
  }

  // n uninitialised elements, 64-byte aligned, valid until this thread's next ForTask.
  template <typename T>
  T* Take(int64_t n) {
    const int64_t bytes = (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    while (block_ < blocks_.size() && used_ + bytes > blocks_[block_].bytes) ++block_, used_ = 0;
    if (block_ == blocks_.size()) {
      const int64_t size = std::max<int64_t>(bytes, int64_t{4} << 20);
      blocks_.push_back({std::unique_ptr<char, decltype(&std::free)>(
                             static_cast<char*>(std::aligned_alloc(64, size)), &std::free), size});
    }
    T* p = reinterpret_cast<T*>(blocks_[block_].data.get() + used_);
    used_ += bytes;
    return p;
  }

 private:
  struct Block {
    std::unique_ptr<char, decltype(&std::free)> data;
    int64_t bytes;
  };
  std::vector<Block> blocks_;
  size_t block_ = 0;
  int64_t used_ = 0;
};

// body(e) for every e < E (an expert, a head), on the calling thread and the pool's others: tasks are claimed one
// at a time, and the call returns once every claimed task is done. A helper that starts late finds nothing to
// claim, so the caller never waits for a pool thread to become free (no deadlock when the pool is busy).
template <typename Body>
void ForEach(ffi::ThreadPool& pool, int64_t E, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, E, &body] {
    state->active.fetch_add(1);
    for (int64_t e; (e = state->next.fetch_add(1)) < E;) body(e);
    state->active.fetch_sub(1);
  };
  for (int64_t i = 1; i < std::min(pool.num_threads(), E); ++i) pool.Schedule([work] { work(); });
  for (int64_t e; (e = state->next.fetch_add(1)) < E;) body(e);
  while (state->active.load() > 0) std::this_thread::yield();
}

// Rows a task of a row-wise handler takes (gather_sum.cc, router.cc): a 4096-token call makes 16 tasks, enough for
// two threads to finish together.
constexpr int64_t ROWS_A_TASK = 256;

// body(r0, r1) over [0, rows) in tasks of `per_task` rows, spread over XLA's threads (ForEach).
template <typename Body>
void ForRows(ffi::ThreadPool& pool, int64_t rows, int64_t per_task, const Body& body) {
  ForEach(pool, (rows + per_task - 1) / per_task,
          [&](int64_t i) { body(i * per_task, std::min(rows, (i + 1) * per_task)); });
}

// exp on 16 floats at a time (glibc's scalar expf was most of the SwiGLU forward's time), as Cephes' expf
// computes it: 2^n times a polynomial of the remainder, ~1 ulp on [-87, 88].
inline V Exp(V x) {
  x = x > 88.f ? V{} + 88.f : x;
  x = x < -87.f ? V{} - 87.f : x;
  const V t = x * 1.44269504089f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(t, VI), V);  // truncated: floor below
  n = n > t ? n - 1.f : n;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * reinterpret_cast<V>((__builtin_convertvector(n, VI) + 127) << 23);
}

}  // namespace
