// XLA:CPU FFI handlers: causal softmax attention, forward and backward in one call each (slmjax/kernels/attention.py).
// XLA runs attention as batched GEMMs over [T, U] score matrices with the softmax as separate loops between them,
// 40-50 GFLOP/s on two cores at 256 positions and heads of 64; here each (batch, key/value head) is one task on
// XLA's intra-op threads, and a block of MR query rows goes through scores, softmax and output while its scores
// are in cache, skipping key blocks past the block's last row (about half the products of the full square).
// The backward recomputes the probabilities from the forward's logsumexp (flash attention's residuals: the
// output and one float a row, not the probabilities). Heads-major operands q [B, K, Q, T, Z], k [B, K, U, Z],
// v [B, K, U, Y], U = T; T, Z and Y multiples of 32.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "products.h"

namespace {

constexpr int G = 64;  // query rows a backward group: the key and value gradients' products run over a group's rows

// Keys a block of MR query rows from m scores against: [0, m + MR) rounded up to whole product kernels.
inline int64_t Cols(int64_t m) { return (m + MR + NB - 1) / NB * NB; }

// s[MR, cols] = a[MR, K] b[K, 0:cols]: a's rows K apart, b's ldb, s's lds.
inline void Scores(const float* a, int64_t K, const float* b, int64_t ldb, int64_t cols, float* s, int64_t lds) {
  for (int64_t j = 0; j < cols; j += NB) Kernel(a, K, 1, b + j, K, ldb, s + j, lds, false);
}

// c[MR, N] = a[MR, 0:K] b[K, N]: a's rows lda apart, b's and c's N.
inline void RowBlockTimes(const float* a, int64_t lda, int64_t K, const float* b, int64_t N, float* c) {
  for (int64_t j = 0; j < N; j += NB) Kernel(a, lda, 1, b + j, K, N, c + j, N, false);
}

// c[MR, N] += a[0:K, MR]^T b[K, N]: a's rows lda apart (the MR columns of a probability or score block).
inline void AddColumnTimes(const float* a, int64_t lda, int64_t K, const float* b, int64_t N, float* c) {
  for (int64_t j = 0; j < N; j += NB) Kernel(a, 1, lda, b + j, K, N, c + j, N, true);
}

const VI kLane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Whether each lane of columns [c, c + L) is past query t (masked by causality).
inline VI Past(int64_t c, int64_t t) { return kLane + static_cast<int32_t>(c) > static_cast<int32_t>(t); }

// s[0:cols] = softmax(scale * s) over keys [0, t], zeros past t; returns the logsumexp of scale * s over [0, t].
inline float SoftmaxRow(float* s, int64_t t, int64_t cols, float scale) {
  V top = V{} + kNegInf;
  for (int64_t c = 0; c < cols; c += L) {
    const V x = Load(s + c) * scale;
    top = Past(c, t) ? top : (x > top ? x : top);
  }
  float m = kNegInf;
  for (int i = 0; i < L; ++i) m = std::max(m, top[i]);
  V sum = V{};
  for (int64_t c = 0; c < cols; c += L) {
    const V e = Past(c, t) ? V{} : Exp(Load(s + c) * scale - m);
    Store(s + c, e);
    sum += e;
  }
  float total = 0.f;
  for (int i = 0; i < L; ++i) total += sum[i];
  const float inv = 1.f / total;
  for (int64_t c = 0; c < cols; c += L) Store(s + c, Load(s + c) * inv);
  return m + std::log(total);
}

// Softmax's backward for query t, in place: s (scores) becomes p = exp(scale s - lse), zeros past t, and dp (the
// probabilities' cotangent) becomes the scores' p (dp - delta) scale, delta = rowsum(dout * out).
inline void BackwardRow(float* s, float* dp, int64_t t, int64_t cols, float scale, float lse, float delta) {
  for (int64_t c = 0; c < cols; c += L) {
    const V p = Past(c, t) ? V{} : Exp(Load(s + c) * scale - lse);
    Store(s + c, p);
    Store(dp + c, p * (Load(dp + c) - delta) * scale);
  }
}

struct Shape {
  int64_t B, K, Q, T, Z, Y;
};

// s = the shape of q [B, K, Q, T, Z], k [B, K, U, Z], v [B, K, U, Y]; an error when the call does not take it.
ffi::Error Check(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                 Shape& s) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q must be [B, K, Q, T, Z], k [B, K, U, Z], v [B, K, U, Y]");
  s = Shape{qd[0], qd[1], qd[2], qd[3], qd[4], vd[3]};
  if (kd[0] != s.B || kd[1] != s.K || kd[2] != s.T || kd[3] != s.Z || vd[0] != s.B || vd[1] != s.K || vd[2] != s.T)
    return ffi::Error::InvalidArgument("attention: k and v must match q's batch, heads and positions (U = T)");
  if (s.T % NB || s.Z % NB || s.Y % NB)
    return ffi::Error::InvalidArgument("attention: positions and head widths must be multiples of 32");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape shape;
  if (ffi::Error error = Check(q, k, v, shape); error.failure()) return error;
  const auto [B, K, Q, T, Z, Y] = shape;
  ForEach(pool, B * K, [&](int64_t h) {
    std::vector<float> kT(Z * T), s(MR * T);
    Transpose(k.typed_data() + h * T * Z, T, Z, kT.data());
    const float* vh = v.typed_data() + h * T * Y;
    for (int64_t i = h * Q; i < (h + 1) * Q; ++i) {
      const float* qh = q.typed_data() + i * T * Z;
      float *oh = out->typed_data() + i * T * Y, *lh = lse->typed_data() + i * T;
      for (int64_t m = 0; m < T; m += MR) {
        const int64_t cols = Cols(m);
        Scores(qh + m * Z, Z, kT.data(), T, cols, s.data(), T);
        for (int r = 0; r < MR; ++r) lh[m + r] = SoftmaxRow(s.data() + r * T, m + r, cols, scale);
        RowBlockTimes(s.data(), T, m + MR, vh, Y, oh + m * Y);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Shape shape;
  if (ffi::Error error = Check(q, k, v, shape); error.failure()) return error;
  const auto [B, K, Q, T, Z, Y] = shape;
  ForEach(pool, B * K, [&](int64_t h) {
    std::vector<float> kT(Z * T), vT(Y * T), p(G * T), ds(G * T), delta(G);
    const float *kh = k.typed_data() + h * T * Z, *vh = v.typed_data() + h * T * Y;
    Transpose(kh, T, Z, kT.data());
    Transpose(vh, T, Y, vT.data());
    float *dkh = dk->typed_data() + h * T * Z, *dvh = dv->typed_data() + h * T * Y;
    std::memset(dkh, 0, T * Z * sizeof(float));
    std::memset(dvh, 0, T * Y * sizeof(float));
    for (int64_t i = h * Q; i < (h + 1) * Q; ++i) {
      const float *qh = q.typed_data() + i * T * Z, *oh = out.typed_data() + i * T * Y;
      const float *doh = dout.typed_data() + i * T * Y, *lh = lse.typed_data() + i * T;
      float* dqh = dq->typed_data() + i * T * Z;
      for (int64_t g0 = 0; g0 < T; g0 += G) {
        const int64_t end = std::min<int64_t>(g0 + G, T);
        for (int64_t t = g0; t < end; ++t) {
          V acc = V{};
          for (int64_t c = 0; c < Y; c += L) acc += Load(doh + t * Y + c) * Load(oh + t * Y + c);
          delta[t - g0] = 0.f;
          for (int l = 0; l < L; ++l) delta[t - g0] += acc[l];
        }
        for (int64_t m = g0; m < end; m += MR) {
          const int64_t cols = Cols(m);
          float *pm = p.data() + (m - g0) * T, *dsm = ds.data() + (m - g0) * T;
          Scores(qh + m * Z, Z, kT.data(), T, cols, pm, T);
          Scores(doh + m * Y, Y, vT.data(), T, cols, dsm, T);
          for (int r = 0; r < MR; ++r)
            BackwardRow(pm + r * T, dsm + r * T, m + r, cols, scale, lh[m + r], delta[m - g0 + r]);
          RowBlockTimes(dsm, T, m + MR, kh, Z, dqh + m * Z);
        }
        // Key block u0 gets the group's rows t >= u0 (earlier rows do not see it); their entries are computed
        // (zeros where masked) since t's row block scored keys past t's own block.
        for (int64_t u0 = 0; u0 < end; u0 += MR) {
          const int64_t t0 = std::max(g0, u0);
          AddColumnTimes(ds.data() + (t0 - g0) * T + u0, T, end - t0, qh + t0 * Z, Z, dkh + u0 * Z);
          AddColumnTimes(p.data() + (t0 - g0) * T + u0, T, end - t0, doh + t0 * Y, Y, dvh + u0 * Y);
        }
      }
    }
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace

// Forward returns out [B, K, Q, T, Y] and the logsumexp of each query's scaled scores [B, K, Q, T]; the backward
// takes them with dout and returns dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionFwd, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Attr<float>("scale").Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionBwd, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()  // out, lse, dout
                                  .Attr<float>("scale").Ret<F32>().Ret<F32>().Ret<F32>());
