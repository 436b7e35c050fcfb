// XLA:CPU FFI handler: one AdamW step of one f32 parameter (slmjax/optim.py's optimizer: global-norm clipping
// factor, Adam's moments, bias correction, decoupled weight decay, learning rate) in one pass over its four
// arrays, the parameter and moments written in place. XLA:CPU runs it as three loops a parameter (each moment,
// then the parameter), ten arrays of traffic where seven do. Operation for operation what optax computes, in the
// same order, without contraction into FMAs (-ffp-contract=off), so the results match optax's.
// Built by slmjax/kernels/adamw.py at first use.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <immintrin.h>

#include "products.h"

namespace {

constexpr int64_t ELEMENTS_A_TASK = 1 << 16;  // 256 KiB a task an array

// The square root of L floats, correctly rounded as std::sqrt.
inline V Sqrt(V x) {
#ifdef __AVX512F__
  return reinterpret_cast<V>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#else
  return reinterpret_cast<V>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#endif
}

// The step's scalars, in the order adamw.py packs them.
struct Hyper {
  float scale;       // the clipping factor on the gradient
  float one_m_b1;    // 1 - b1, as optax's f32 constant
  float b1;
  float one_m_b2;
  float b2;
  float bias1;       // 1 - b1^t
  float bias2;       // 1 - b2^t
  float eps;
  float decay;       // weight decay (0 for parameters it masks out)
  float neg_lr;      // -learning rate
};

ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> p_out,
                ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const int64_t n = p.element_count();
  if (g.element_count() != n || m.element_count() != n || v.element_count() != n)
    return ffi::Error::InvalidArgument("adamw: the parameter, gradient and moments must have one size");
  if (hyper.element_count() != sizeof(Hyper) / sizeof(float))
    return ffi::Error::InvalidArgument("adamw: hyper must hold the 10 scalars adamw.py packs");
  Hyper h;
  std::copy_n(hyper.typed_data(), sizeof(Hyper) / sizeof(float), reinterpret_cast<float*>(&h));
  const float *ps = p.typed_data(), *gs = g.typed_data(), *ms = m.typed_data(), *vs = v.typed_data();
  float *po = p_out->typed_data(), *mo = m_out->typed_data(), *vo = v_out->typed_data();
  ForEach(pool, (n + ELEMENTS_A_TASK - 1) / ELEMENTS_A_TASK, [&](int64_t task) {
    const int64_t i0 = task * ELEMENTS_A_TASK, i1 = std::min(n, i0 + ELEMENTS_A_TASK);
    int64_t i = i0;
    for (; i + L <= i1; i += L) {  // L at a time: the loop over floats did not vectorize (3x slower than XLA)
      const V gi = Load(gs + i) * h.scale, pi = Load(ps + i);
      const V mi = h.one_m_b1 * gi + h.b1 * Load(ms + i);
      const V vi = h.one_m_b2 * (gi * gi) + h.b2 * Load(vs + i);
      const V u = (mi / h.bias1) / (Sqrt(vi / h.bias2) + h.eps) + h.decay * pi;
      Store(po + i, pi + u * h.neg_lr);
      Store(mo + i, mi);
      Store(vo + i, vi);
    }
    for (; i < i1; ++i) {
      const float gi = gs[i] * h.scale;
      const float mi = h.one_m_b1 * gi + h.b1 * ms[i];
      const float vi = h.one_m_b2 * (gi * gi) + h.b2 * vs[i];
      const float u = (mi / h.bias1) / (std::sqrt(vi / h.bias2) + h.eps) + h.decay * ps[i];
      po[i] = ps[i] + u * h.neg_lr;
      mo[i] = mi;
      vo[i] = vi;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// p, g, m, v [any shape, f32], hyper [10] -> p, m, v (adamw.py aliases them to the inputs).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAdamw, Step,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
