// XLA:CPU FFI handlers: the weighted gather-sum that combines a token's rows from a buffer of rows sorted by
// expert, y[t] = sum_a w[t, a] src[dest[t, a]] (slmjax/dispatch/rows.py's combine_rows, and sum_rows with w = 1),
// and its backward. XLA:CPU runs these as, for each of a token's A rows, a gather of bf16 bits and a convert of
// the gathered [X, D] block to f32, then a multiply-add: passes of their own over [X, D] at a few GB/s; here one
// pass, f32 sums, bf16 rounded once. Rows are f32 or bf16 (the same code: bf16 widened and rounded on vectors),
// weights f32. Built by slmjax/kernels/gather_sum.py at first use with -O3 -march=native. Widths must be
// multiples of 16.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "products.h"

namespace {

ffi::Error CheckWidth(int64_t D) {
  if (D % 16) return ffi::Error::InvalidArgument("gather_sum: the row width must be a multiple of 16");
  return ffi::Error::Success();
}

// out[t] = sum_a weight[t, a] src[dest[t, a]], the terms whose dest is outside [0, N) left out (dropped).
template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> src, ffi::Buffer<ffi::F32> weight,
                   ffi::Buffer<ffi::S32> dest, ffi::ResultBuffer<DT> out) {
  const int64_t N = src.dimensions()[0], D = src.dimensions()[1];
  const int64_t X = dest.dimensions()[0], A = dest.dimensions()[1];
  if (ffi::Error e = CheckWidth(D); e.failure()) return e;
  const Elem<DT>* s = Data(src);
  Elem<DT>* y = Data(out);
  const float* w = weight.typed_data();
  const int32_t* d = dest.typed_data();
  ForRows(pool, X, ROWS_A_TASK, [&](int64_t t0, int64_t t1) {
    float* acc = Scratch::ForTask().Take<float>(D);
    for (int64_t t = t0; t < t1; ++t) {
      std::memset(acc, 0, D * sizeof(float));
      for (int64_t a = 0; a < A; ++a) {
        const int64_t n = d[t * A + a];
        if (n < 0 || n >= N) continue;
        const float wa = w[t * A + a];
        const Elem<DT>* row = s + n * D;
        for (int64_t j = 0; j < D; j += L) Store(acc + j, Load(acc + j) + wa * Widen(row + j));
      }
      for (int64_t j = 0; j < D; j += L) Put(Load(acc + j), y + t * D + j);
    }
  });
  return ffi::Error::Success();
}

// The cotangents of Forward's src and weight from its output's, dy: dsrc[n] = weight[asg[n]] dy[asg[n] / A]
// (asg[n] the flat assignment t * A + a that row n holds, outside [0, X * A) for none: a zero row), and
// dweight[t, a] = <src[dest[t, a]], dy[t]> (zero where dropped).
template <ffi::DataType DT>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<DT> src, ffi::Buffer<ffi::F32> weight,
                    ffi::Buffer<ffi::S32> dest, ffi::Buffer<ffi::S32> asg, ffi::Buffer<DT> dy,
                    ffi::ResultBuffer<DT> dsrc, ffi::ResultBuffer<ffi::F32> dweight) {
  const int64_t N = src.dimensions()[0], D = src.dimensions()[1];
  const int64_t X = dest.dimensions()[0], A = dest.dimensions()[1];
  if (ffi::Error e = CheckWidth(D); e.failure()) return e;
  if (asg.dimensions()[0] != N) return ffi::Error::InvalidArgument("gather_sum: asg must have src's rows");
  const Elem<DT>*s = Data(src), *g = Data(dy);
  Elem<DT>* ds = Data(dsrc);
  const float* w = weight.typed_data();
  float* dw = dweight->typed_data();
  const int32_t *d = dest.typed_data(), *as = asg.typed_data();
  const int64_t src_tasks = (N + ROWS_A_TASK - 1) / ROWS_A_TASK;
  ForEach(pool, src_tasks + (X + ROWS_A_TASK - 1) / ROWS_A_TASK, [&](int64_t i) {
    if (i < src_tasks) {
      for (int64_t n = i * ROWS_A_TASK; n < std::min(N, (i + 1) * ROWS_A_TASK); ++n) {
        const int64_t k = as[n];
        Elem<DT>* row = ds + n * D;
        if (k < 0 || k >= X * A) {
          std::memset(row, 0, D * sizeof(Elem<DT>));
          continue;
        }
        const float wk = w[k];
        const Elem<DT>* up = g + (k / A) * D;
        for (int64_t j = 0; j < D; j += L) Put(wk * Widen(up + j), row + j);
      }
      return;
    }
    const int64_t t0 = (i - src_tasks) * ROWS_A_TASK;
    for (int64_t t = t0; t < std::min(X, t0 + ROWS_A_TASK); ++t)
      for (int64_t a = 0; a < A; ++a) {
        const int64_t n = d[t * A + a];
        V sum{};
        if (n >= 0 && n < N)
          for (int64_t j = 0; j < D; j += L) sum += Widen(s + n * D + j) * Widen(g + t * D + j);
        float total = 0.f;
        for (int l = 0; l < L; ++l) total += sum[l];
        dw[t * A + a] = total;
      }
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto BindForward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<ffi::Buffer<DT>>().template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>().template Ret<ffi::Buffer<DT>>();
}

template <ffi::DataType DT>
auto BindBackward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<ffi::Buffer<DT>>().template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>().template Arg<ffi::Buffer<ffi::S32>>().template Arg<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>().template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

// Forward: src [N, D], weight [X, A], dest [X, A] -> out [X, D]. Backward: also asg [N] and dy [X, D] -> dsrc
// [N, D], dweight [X, A]. Rows f32 or bf16 (the Bf16 handlers), weights and their cotangents f32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxGatherSumFwd, Forward<ffi::F32>, BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxGatherSumBwd, Backward<ffi::F32>, BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxGatherSumFwdBf16, Forward<ffi::BF16>, BindForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxGatherSumBwdBf16, Backward<ffi::BF16>, BindBackward<ffi::BF16>());
