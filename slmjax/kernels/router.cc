// XLA:CPU FFI handlers: the MoE router's product logits = x w (x [X, D] f32 or bf16, w [D, E] f32, logits f32)
// and its backward, dx = dlogits w^T in x's dtype and dw = x^T dlogits in f32. XLA:CPU made an f32 copy of a bf16
// x for the forward, kept it for the backward, and ran dw, a [D, X] x [X, E] product with E = 8, on one thread
// (~1 ms a layer); here x is read as it is, once each way, and every product is spread over XLA's threads.
// Built by slmjax/kernels/router.py at first use with -O3 -march=native. D must be a multiple of 16.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "products.h"

namespace {

constexpr int64_t EB = 8;  // experts a pass of the forward

inline float Sum(V v) {
  float total = 0.f;
  for (int l = 0; l < L; ++l) total += v[l];
  return total;
}

ffi::Error CheckShapes(int64_t D, int64_t w_rows) {
  if (D % 16) return ffi::Error::InvalidArgument("router: d_model must be a multiple of 16");
  if (w_rows != D) return ffi::Error::InvalidArgument("router: w must have x's width as its rows");
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> logits) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], E = w.dimensions()[1];
  if (ffi::Error e = CheckShapes(D, w.dimensions()[0]); e.failure()) return e;
  std::vector<float> wT(E * D);  // [E, D]: each logit a dot of two contiguous rows
  Transpose(w.typed_data(), D, E, wT.data());
  const Elem<DT>* xs = Data(x);
  float* out = logits->typed_data();
  ForRows(pool, X, ROWS_A_TASK, [&](int64_t t0, int64_t t1) {
    float* row = Scratch::ForTask().Take<float>(D);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < D; j += L) Store(row + j, Widen(xs + t * D + j));
      for (int64_t e0 = 0; e0 < E; e0 += EB) {  // EB experts' sums in registers: x's row read once for them
        const int64_t n = std::min<int64_t>(EB, E - e0);
        V acc[EB] = {};
        for (int64_t j = 0; j < D; j += L) {
          const V xj = Load(row + j);
#pragma GCC unroll 8
          for (int64_t e = 0; e < EB; ++e)
            if (e < n) acc[e] += xj * Load(wT.data() + (e0 + e) * D + j);
        }
        for (int64_t e = 0; e < n; ++e) out[t * E + e0 + e] = Sum(acc[e]);
      }
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dlogits,
                    ffi::ResultBuffer<DT> dx, ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t X = x.dimensions()[0], D = x.dimensions()[1], E = w.dimensions()[1];
  if (ffi::Error e = CheckShapes(D, w.dimensions()[0]); e.failure()) return e;
  std::vector<float> wT(E * D);
  Transpose(w.typed_data(), D, E, wT.data());
  // At most a few tasks a thread, each over an even share of the rows with its own dw^T [E, D] share (summed
  // after): the shares' memory and their serial sum stay small however many tokens come.
  const int64_t tasks = std::min((X + ROWS_A_TASK - 1) / ROWS_A_TASK, 4 * std::max<int64_t>(1, pool.num_threads()));
  const int64_t rows = tasks ? (X + tasks - 1) / tasks : 1;
  std::vector<float> partial(std::max<int64_t>(tasks, 1) * E * D, 0.f);  // zero: dw for no tokens
  if (E == 0) std::memset(Data(dx), 0, X * D * sizeof(Elem<DT>));
  const Elem<DT>* xs = Data(x);
  const float* dl = dlogits.typed_data();
  Elem<DT>* dxs = Data(dx);
  ForRows(pool, X, rows, [&](int64_t t0, int64_t t1) {
    float* dwT = partial.data() + t0 / rows * E * D;
    float* dx_rows = Scratch::ForTask().Take<float>(rows * L);  // dx's column block in f32 across blocks
    for (int64_t j = 0; j < D; j += L)  // a column block of dx and dw^T at a time, w^T's and dw^T's in registers
      for (int64_t e0 = 0; e0 < E; e0 += EB) {
        const int64_t n = std::min<int64_t>(EB, E - e0);
        V w_e[EB], dw_e[EB];
#pragma GCC unroll 8
        for (int64_t e = 0; e < EB; ++e) w_e[e] = e < n ? Load(wT.data() + (e0 + e) * D + j) : V{}, dw_e[e] = V{};
        for (int64_t t = t0; t < t1; ++t) {
          const V xj = Widen(xs + t * D + j);
          float* dx_t = dx_rows + (t - t0) * L;
          V acc = e0 ? Load(dx_t) : V{};  // later expert blocks add to what the first wrote
#pragma GCC unroll 8
          for (int64_t e = 0; e < EB; ++e)
            if (e < n) {
              const float g = dl[t * E + e0 + e];
              acc += g * w_e[e];
              dw_e[e] += g * xj;
            }
          if (e0 + EB < E)
            Store(dx_t, acc);
          else
            Put(acc, dxs + t * D + j);
        }
        for (int64_t e = 0; e < n; ++e) Store(dwT + (e0 + e) * D + j, dw_e[e]);
      }
  });
  float* dws = dw->typed_data();  // dw [D, E] = the tasks' dw^T summed, transposed
  for (int64_t task = 1; task < tasks; ++task)
    for (int64_t i = 0; i < E * D; ++i) partial[i] += partial[task * E * D + i];
  Transpose(partial.data(), E, D, dws);
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto BindForward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<ffi::Buffer<DT>>().template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

template <ffi::DataType DT>
auto BindBackward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<ffi::Buffer<DT>>().template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>().template Ret<ffi::Buffer<DT>>().template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

// Forward: x [X, D], w [D, E] -> logits [X, E]. Backward: also dlogits [X, E] -> dx [X, D], dw [D, E]. x and dx
// f32 or bf16 (the Bf16 handlers), the rest f32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxRouterFwd, Forward<ffi::F32>, BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxRouterBwd, Backward<ffi::F32>, BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxRouterFwdBf16, Forward<ffi::BF16>, BindForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxRouterBwdBf16, Backward<ffi::BF16>, BindBackward<ffi::BF16>());
