// XLA:CPU FFI handlers: the SwiGLU FFN of narrow experts, forward and backward, in one call each (the dropless
// experts of slmjax/dispatch/fused_swiglu.py; the dense FFN as parts of d_ff, slmjax/kernels/swiglu_ffn.py).
// Rows are sorted by expert (sizes[e] rows each, row n reads x[row_src[n]]), as for slmjax/dispatch/grouped.py's
// row tiles, which at d_model 32-128 spend most of their time in XLA's per-op
// overhead (loops, slices, small GEMMs at a third of the big ones' FLOP rate). Here each expert's run is
// processed in blocks of RB rows with one register-blocked f32 product kernel (MR x NB accumulators, for the
// row products and, over a block's rows, the weight gradients), experts spread over XLA's own intra-op threads.
// Built by slmjax/kernels/swiglu_ffn.py at first use with -O3 -march=native (the bf16 handlers only where the CPU
// has AVX512_BF16). Widths must be multiples of 32.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "products.h"

namespace {

constexpr int RB = 64;  // rows per block: a weight gradient reads and writes its accumulator once a block

// Where each expert's run of sorted rows starts and ends, and the rows of all runs.
struct Runs {
  std::vector<int64_t> start, end;
  int64_t total = 0;
  explicit Runs(const int32_t* sizes, int64_t E) : start(E), end(E) {
    for (int64_t e = 0; e < E; ++e) start[e] = total, end[e] = total += std::max<int32_t>(sizes[e], 0);
  }
  // Zeros in buf [N, width]'s rows past the runs (the slack rows).
  template <typename T>
  void ZeroPast(T* buf, int64_t N, int64_t width) const {
    std::memset(buf + total * width, 0, (N - total) * width * sizeof(T));
  }
};

// body(e) for every expert e on XLA's threads (ForEach), claimed longest run first, so the threads finish together
// (a long run claimed last would leave the others idle while it runs).
template <typename Body>
void ForEachExpert(ffi::ThreadPool& pool, const Runs& runs, const Body& body) {
  std::vector<int64_t> order(runs.start.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return runs.end[a] - runs.start[a] > runs.end[b] - runs.start[b];
  });
  ForEach(pool, order.size(), [&](int64_t i) { body(order[i]); });
}

// A block's rows rounded up to whole product kernels: the rows the products run on.
inline int Padded(int rows) { return (rows + MR - 1) / MR * MR; }

// dst[Padded(rows), width] = the first `rows` rows of src, then zeros (a block's rows past its run).
template <typename T>
inline void CopyBlock(const T* src, int rows, int64_t width, T* dst) {
  std::memcpy(dst, src, rows * width * sizeof(T));
  std::memset(dst + rows * width, 0, (Padded(rows) - rows) * width * sizeof(T));
}

// Block [n0, n0 + RB) of a run ending at `end`, its `rows` x rows gathered (clipped to X) and zeros up to
// Padded(rows); returns `rows`.
template <typename T>
inline int GatherBlock(const T* x, int64_t X, int64_t D, const int32_t* row_src, int64_t n0, int64_t end, T* xb) {
  const int rows = static_cast<int>(std::min<int64_t>(RB, end - n0));
  for (int r = 0; r < rows; ++r)
    std::memcpy(xb + r * D, x + std::clamp<int64_t>(row_src[n0 + r], 0, X - 1) * D, D * sizeof(T));
  std::memset(xb + rows * D, 0, (Padded(rows) - rows) * D * sizeof(T));
  return rows;
}

// The activation on 16 floats at a time (vectors: the loops over scalars did not vectorize).
inline V Sigmoid(V g) { return 1.f / (1.f + Exp(-g)); }

// h = silu(g) u over `size` (a multiple of 16) elements.
inline void SwigluForward(const float* g, const float* u, float* h, int64_t size) {
  for (int64_t i = 0; i < size; i += L) {
    const V gi = Load(g + i);
    Store(h + i, gi * Sigmoid(gi) * Load(u + i));
  }
}

// h = silu(g) u, and the cotangents of g and u from h's, dh.
inline void SwigluBackward(const float* g, const float* u, const float* dh, float* h, float* dg, float* du,
                           int64_t size) {
  for (int64_t i = 0; i < size; i += L) {
    const V gi = Load(g + i), ui = Load(u + i), dhi = Load(dh + i);
    const V s = Sigmoid(gi), silu = gi * s;
    Store(h + i, silu * ui);
    Store(du + i, dhi * silu);
    Store(dg + i, dhi * ui * s * (1.f + gi * (1.f - s)));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> row_src,
                   ffi::Buffer<ffi::S32> sizes,
                   ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> up) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], N = row_src.dimensions()[0];
  const int64_t E = w_up.dimensions()[0], F = w_up.dimensions()[2];
  const Runs runs(sizes.typed_data(), E);
  if (runs.total > N) return ffi::Error::InvalidArgument("swiglu_ffn: more sorted rows than row_src holds");
  float *y_ND = y->typed_data(), *gate_NF = gate->typed_data(), *up_NF = up->typed_data();
  runs.ZeroPast(y_ND, N, D), runs.ZeroPast(gate_NF, N, F), runs.ZeroPast(up_NF, N, F);
  ForEachExpert(pool, runs, [&](int64_t e) {
    Scratch& scratch = Scratch::ForTask();
    float *xb = scratch.Take<float>(RB * D), *g = scratch.Take<float>(RB * F), *u = scratch.Take<float>(RB * F),
        *h = scratch.Take<float>(RB * F), *yb = scratch.Take<float>(RB * D);
    const float *wg = w_gate.typed_data() + e * D * F, *wu = w_up.typed_data() + e * D * F;
    const float* wd = w_down.typed_data() + e * F * D;
    for (int64_t n0 = runs.start[e]; n0 < runs.end[e]; n0 += RB) {
      const int rows = GatherBlock(x.typed_data(), X, D, row_src.typed_data(), n0, runs.end[e], xb);
      const int M = Padded(rows);
      RowsTimes(xb, M, D, wg, F, g, false);
      RowsTimes(xb, M, D, wu, F, u, false);
      SwigluForward(g, u, h, M * F);
      RowsTimes(h, M, F, wd, D, yb, false);
      std::memcpy(y_ND + n0 * D, yb, rows * D * sizeof(float));
      std::memcpy(gate_NF + n0 * F, g, rows * F * sizeof(float));
      std::memcpy(up_NF + n0 * F, u, rows * F * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> row_src,
                    ffi::Buffer<ffi::S32> sizes,
                    ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                    ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw_gate,
                    ffi::ResultBuffer<ffi::F32> dw_up, ffi::ResultBuffer<ffi::F32> dw_down) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], N = row_src.dimensions()[0];
  const int64_t E = w_up.dimensions()[0], F = w_up.dimensions()[2];
  const Runs runs(sizes.typed_data(), E);
  if (runs.total > N) return ffi::Error::InvalidArgument("swiglu_ffn: more sorted rows than row_src holds");
  float* dx_ND = dx->typed_data();
  runs.ZeroPast(dx_ND, N, D);
  ForEachExpert(pool, runs, [&](int64_t e) {
    Scratch& scratch = Scratch::ForTask();
    float *xb = scratch.Take<float>(RB * D), *dyb = scratch.Take<float>(RB * D), *g = scratch.Take<float>(RB * F),
        *u = scratch.Take<float>(RB * F), *dh = scratch.Take<float>(RB * F), *h = scratch.Take<float>(RB * F),
        *dg = scratch.Take<float>(RB * F), *du = scratch.Take<float>(RB * F), *dxb = scratch.Take<float>(RB * D),
        *wgT = scratch.Take<float>(F * D), *wuT = scratch.Take<float>(F * D), *wdT = scratch.Take<float>(D * F);
    const float *wg = w_gate.typed_data() + e * D * F, *wu = w_up.typed_data() + e * D * F;
    const float* wd = w_down.typed_data() + e * F * D;
    float *dwg = dw_gate->typed_data() + e * D * F, *dwu = dw_up->typed_data() + e * D * F;
    float* dwd = dw_down->typed_data() + e * F * D;
    std::memset(dwg, 0, D * F * sizeof(float));
    std::memset(dwu, 0, D * F * sizeof(float));
    std::memset(dwd, 0, F * D * sizeof(float));
    Transpose(wg, D, F, wgT);
    Transpose(wu, D, F, wuT);
    Transpose(wd, F, D, wdT);
    for (int64_t n0 = runs.start[e]; n0 < runs.end[e]; n0 += RB) {
      const int rows = GatherBlock(x.typed_data(), X, D, row_src.typed_data(), n0, runs.end[e], xb);
      CopyBlock(dy.typed_data() + n0 * D, rows, D, dyb);  // zero past the run: no share in any gradient
      CopyBlock(gate.typed_data() + n0 * F, rows, F, g);
      CopyBlock(up.typed_data() + n0 * F, rows, F, u);
      const int M = Padded(rows);
      RowsTimes(dyb, M, D, wdT, F, dh, false);
      SwigluBackward(g, u, dh, h, dg, du, M * F);
      RowsTimes(dg, M, F, wgT, D, dxb, false);
      RowsTimes(du, M, F, wuT, D, dxb, true);
      std::memcpy(dx_ND + n0 * D, dxb, rows * D * sizeof(float));
      AddOuter(h, rows, F, dyb, D, dwd);
      AddOuter(xb, rows, D, dg, F, dwg);
      AddOuter(xb, rows, D, du, F, dwu);
    }
  });
  return ffi::Error::Success();
}

#ifdef __AVX512BF16__
// bf16 operands (x, dy; y and dx out; the f32 weights rounded to bf16 as they are packed), every product on the
// CPU's bf16 dot units (vdpbf16ps: two bf16 products a lane per instruction, summed in f32: 210 GFLOP/s a core here
// against 112 for the f32 kernel); the activation in f32 on f32 gate and up, which are kept for the backward in
// bf16 (as autocast keeps them: half the bytes written and read back, half the step's largest temporaries), weight
// gradients summed and returned in f32. The dot units take K in pairs, so the B operand is packed [K / 2][N][2]
// and the A operand read as 32-bit pairs along K.

// dst = src rounded to bf16 (nearest even), `size` a multiple of 32.
inline void Round(const float* src, int64_t size, bf16* dst) {
  for (int64_t i = 0; i < size; i += 2 * L) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + L), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)pair);
  }
}

// dst[Padded(rows), width] = the first `rows` rows of src (bf16) in f32, then zeros; width a multiple of 16.
inline void WidenBlock(const bf16* src, int rows, int64_t width, float* dst) {
  for (int64_t i = 0; i < rows * width; i += L) Store(dst + i, Widen(src + i));
  std::memset(dst + rows * width, 0, (Padded(rows) - rows) * width * sizeof(float));
}

// c[MR, NB] (+)= sum over K2 pairs of a(r, k) b[k, 0:NB]: a's pairs at a[r * ar + k2 * ak], b packed [K2][ldb][2].
__attribute__((always_inline)) inline void PairKernel(const uint32_t* a, int64_t ar, int64_t ak, const bf16* b,
                                                      int64_t K2, int64_t ldb, float* c, int64_t ldc,
                                                      bool accumulate) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + L * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + 2 * k * ldb);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 2 * k * ldb + 2 * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * ar + k * ak]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) _mm512_storeu_ps(c + r * ldc + L * j, acc[r][j]);
}

// c[M, N] (+)= a(m, k) b[K, N] over K = 2 K2: a's pairs at a[m * am + k2 * ak], b packed [K2][N][2].
inline void PairTimes(const uint32_t* a, int64_t am, int64_t ak, int64_t M, int64_t K2, const bf16* b, int64_t N,
                      float* c, bool accumulate) {
  for (int64_t m = 0; m < M; m += MR)
    for (int64_t j = 0; j < N; j += NB)
      PairKernel(a + m * am, am, ak, b + 2 * j, K2, N, c + m * N + j, N, accumulate);
}

// dst [K / 2][N][2] = src [K, N] rows interleaved in pairs: a row-major block packed for the dot units (N a
// multiple of 32), and, read as 32-bit pairs with strides (1, N), the transposed A operand of a weight gradient.
inline void Interleave(const bf16* src, int64_t K, int64_t N, bf16* dst) {
  alignas(64) static const uint16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(lo), idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t j = 0; j < N; j += 32) {
      const __m512i r0 = _mm512_loadu_si512(src + k * N + j), r1 = _mm512_loadu_si512(src + (k + 1) * N + j);
      _mm512_storeu_si512(dst + k * N + 2 * j, _mm512_permutex2var_epi16(r0, idx_lo, r1));
      _mm512_storeu_si512(dst + k * N + 2 * j + 32, _mm512_permutex2var_epi16(r0, idx_hi, r1));
    }
}

inline const uint32_t* Pairs(const bf16* p) { return reinterpret_cast<const uint32_t*>(p); }

// dst [K / 2][N][2] = src [K, N] (f32 weights) in bf16, packed for the dot units (tmp: K x N bf16).
inline void PackRows(const float* src, int64_t K, int64_t N, bf16* tmp, bf16* dst) {
  Round(src, K * N, tmp);
  Interleave(tmp, K, N, dst);
}

// dst [K / 2][N][2] = src [N, K]^T (f32 weights) in bf16, packed for the dot units: rounded, then transposed as
// 32-bit pairs (src's adjacent columns are a pair; tmp: N x K bf16). 30 us for 256 x 512 here, 122 us element
// by element.
inline void PackColumns(const float* src, int64_t N, int64_t K, bf16* tmp, bf16* dst) {
  Round(src, N * K, tmp);
  Transpose(reinterpret_cast<const uint32_t*>(tmp), N, K / 2, reinterpret_cast<uint32_t*>(dst));
}

ffi::Error ForwardBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> row_src,
                       ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                       ffi::Buffer<ffi::F32> w_down, ffi::ResultBuffer<ffi::BF16> y,
                       ffi::ResultBuffer<ffi::BF16> gate, ffi::ResultBuffer<ffi::BF16> up) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], N = row_src.dimensions()[0];
  const int64_t E = w_up.dimensions()[0], F = w_up.dimensions()[2];
  const Runs runs(sizes.typed_data(), E);
  if (runs.total > N) return ffi::Error::InvalidArgument("swiglu_ffn: more sorted rows than row_src holds");
  const bf16* xs = Data(x);
  bf16 *y_ND = Data(y), *gate_NF = Data(gate), *up_NF = Data(up);
  runs.ZeroPast(y_ND, N, D), runs.ZeroPast(gate_NF, N, F), runs.ZeroPast(up_NF, N, F);
  ForEachExpert(pool, runs, [&](int64_t e) {
    if (runs.end[e] == runs.start[e]) return;
    Scratch& scratch = Scratch::ForTask();
    bf16 *xb = scratch.Take<bf16>(RB * D), *hb = scratch.Take<bf16>(RB * F), *wg = scratch.Take<bf16>(D * F),
        *wu = scratch.Take<bf16>(D * F), *wd = scratch.Take<bf16>(F * D), *tmp = scratch.Take<bf16>(D * F);
    float *g = scratch.Take<float>(RB * F), *u = scratch.Take<float>(RB * F), *h = scratch.Take<float>(RB * F),
        *yb = scratch.Take<float>(RB * D);
    PackRows(w_gate.typed_data() + e * D * F, D, F, tmp, wg);
    PackRows(w_up.typed_data() + e * D * F, D, F, tmp, wu);
    PackRows(w_down.typed_data() + e * F * D, F, D, tmp, wd);
    for (int64_t n0 = runs.start[e]; n0 < runs.end[e]; n0 += RB) {
      const int rows = GatherBlock(xs, X, D, row_src.typed_data(), n0, runs.end[e], xb);
      const int M = Padded(rows);
      PairTimes(Pairs(xb), D / 2, 1, M, D / 2, wg, F, g, false);
      PairTimes(Pairs(xb), D / 2, 1, M, D / 2, wu, F, u, false);
      SwigluForward(g, u, h, M * F);
      Round(h, M * F, hb);
      PairTimes(Pairs(hb), F / 2, 1, M, F / 2, wd, D, yb, false);
      Round(yb, rows * D, y_ND + n0 * D);
      Round(g, rows * F, gate_NF + n0 * F);
      Round(u, rows * F, up_NF + n0 * F);
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> row_src,
                        ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                        ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::BF16> gate, ffi::Buffer<ffi::BF16> up,
                        ffi::Buffer<ffi::BF16> dy, ffi::ResultBuffer<ffi::BF16> dx,
                        ffi::ResultBuffer<ffi::F32> dw_gate, ffi::ResultBuffer<ffi::F32> dw_up,
                        ffi::ResultBuffer<ffi::F32> dw_down) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], N = row_src.dimensions()[0];
  const int64_t E = w_up.dimensions()[0], F = w_up.dimensions()[2];
  const Runs runs(sizes.typed_data(), E);
  if (runs.total > N) return ffi::Error::InvalidArgument("swiglu_ffn: more sorted rows than row_src holds");
  const bf16 *xs = Data(x), *dys = Data(dy), *gs = Data(gate), *us = Data(up);
  bf16* dx_ND = Data(dx);
  runs.ZeroPast(dx_ND, N, D);
  ForEachExpert(pool, runs, [&](int64_t e) {
    float *dwg = dw_gate->typed_data() + e * D * F, *dwu = dw_up->typed_data() + e * D * F;
    float* dwd = dw_down->typed_data() + e * F * D;
    std::memset(dwg, 0, D * F * sizeof(float));
    std::memset(dwu, 0, D * F * sizeof(float));
    std::memset(dwd, 0, F * D * sizeof(float));
    if (runs.end[e] == runs.start[e]) return;
    Scratch& scratch = Scratch::ForTask();
    bf16 *xb = scratch.Take<bf16>(RB * D), *dyb = scratch.Take<bf16>(RB * D), *hb = scratch.Take<bf16>(RB * F),
        *dgb = scratch.Take<bf16>(RB * F), *dub = scratch.Take<bf16>(RB * F), *wgT = scratch.Take<bf16>(F * D),
        *wuT = scratch.Take<bf16>(F * D), *wdT = scratch.Take<bf16>(D * F),
        *aT = scratch.Take<bf16>(std::max(D, F) * RB), *bP = scratch.Take<bf16>(RB * std::max(D, F)),
        *tmp = scratch.Take<bf16>(D * F);
    float *g = scratch.Take<float>(RB * F), *u = scratch.Take<float>(RB * F), *dh = scratch.Take<float>(RB * F),
        *h = scratch.Take<float>(RB * F), *dg = scratch.Take<float>(RB * F), *du = scratch.Take<float>(RB * F),
        *dxb = scratch.Take<float>(RB * D);
    const float *wg = w_gate.typed_data() + e * D * F, *wu = w_up.typed_data() + e * D * F;
    const float* wd = w_down.typed_data() + e * F * D;
    PackColumns(wg, D, F, tmp, wgT);  // B(f, d) = w_gate[d, f]
    PackColumns(wu, D, F, tmp, wuT);
    PackColumns(wd, F, D, tmp, wdT);  // B(d, f) = w_down[f, d]
    for (int64_t n0 = runs.start[e]; n0 < runs.end[e]; n0 += RB) {
      const int rows = GatherBlock(xs, X, D, row_src.typed_data(), n0, runs.end[e], xb);
      const int M = Padded(rows);
      CopyBlock(dys + n0 * D, rows, D, dyb);  // zero past the run: no share in any gradient
      WidenBlock(gs + n0 * F, rows, F, g);
      WidenBlock(us + n0 * F, rows, F, u);
      PairTimes(Pairs(dyb), D / 2, 1, M, D / 2, wdT, F, dh, false);
      SwigluBackward(g, u, dh, h, dg, du, M * F);
      Round(h, M * F, hb);
      Round(dg, M * F, dgb);
      Round(du, M * F, dub);
      PairTimes(Pairs(dgb), F / 2, 1, M, F / 2, wgT, D, dxb, false);
      PairTimes(Pairs(dub), F / 2, 1, M, F / 2, wuT, D, dxb, true);
      Round(dxb, rows * D, dx_ND + n0 * D);
      // Weight gradients over the block's M rows (the padded ones zero): K = M, in pairs of rows.
      Interleave(hb, M, F, aT);
      Interleave(dyb, M, D, bP);
      PairTimes(Pairs(aT), 1, F, F, M / 2, bP, D, dwd, true);
      Interleave(xb, M, D, aT);
      Interleave(dgb, M, F, bP);
      PairTimes(Pairs(aT), 1, D, D, M / 2, bP, F, dwg, true);
      Interleave(dub, M, F, bP);
      PairTimes(Pairs(aT), 1, D, D, M / 2, bP, F, dwu, true);
    }
  });
  return ffi::Error::Success();
}
#endif  // __AVX512BF16__

using F32 = ffi::Buffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;

// The arguments both calls start with: the pool, then x (T: f32, or bf16 for the bf16 calls), row_src, sizes and
// the three stacked weights (f32 for both).
template <typename T = F32>
auto BindCommon() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<T>().template Arg<S32>().template Arg<S32>()
      .template Arg<F32>().template Arg<F32>().template Arg<F32>();
}

}  // namespace

// Forward returns y [N, D], gate [N, F], up [N, F]; the backward also takes gate, up and dy, and returns dx [N, D]
// and the three weight gradients.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxSwigluFfnFwd, Forward, BindCommon().Ret<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxSwigluFfnBwd, Backward,
                              BindCommon().Arg<F32>().Arg<F32>().Arg<F32>()  // gate, up, dy
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>());
#ifdef __AVX512BF16__
// The bf16 calls: y, dx and the gate and up activations the backward takes in bf16, the weight gradients in f32.
using BF16 = ffi::Buffer<ffi::BF16>;
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxSwigluFfnFwdBf16, ForwardBf16,
                              BindCommon<BF16>().Ret<BF16>().Ret<BF16>().Ret<BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxSwigluFfnBwdBf16, BackwardBf16,
                              BindCommon<BF16>().Arg<BF16>().Arg<BF16>().Arg<BF16>()  // gate, up, dy
                                  .Ret<BF16>().Ret<F32>().Ret<F32>().Ret<F32>());
#endif
