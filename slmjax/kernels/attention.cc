// XLA:CPU FFI handlers: causal softmax attention, forward and backward in one call each (slmjax/kernels/attention.py).
// XLA runs attention as batched GEMMs over [T, U] score matrices with the softmax as separate loops between them,
// 40-50 GFLOP/s on two cores at 256 positions and heads of 64; here each (batch, key/value head) is one task on
// XLA's intra-op threads, and a block of MR query rows goes through scores, softmax and output while its scores
// are in cache, skipping key blocks past the block's last row (about half the products of the full square).
// The backward recomputes the probabilities from the forward's logsumexp (flash attention's residuals: the
// output and one float a row, not the probabilities). Operands in the projections' token-major layout, read and
// written with strides (no transposed copies): q [B, T, K, Q, Z], k [B, U, K, Z], v [B, U, K, Y], U = T; T, Z and
// Y multiples of 32.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "products.h"

namespace {

constexpr int G = 64;  // query rows a backward group: the key and value gradients' products run over a group's rows

// Keys a block of MR query rows from m scores against: [0, m + MR) rounded up to whole product kernels.
inline int64_t Cols(int64_t m) { return (m + MR + NB - 1) / NB * NB; }

// s[MR, cols] = a[MR, K] b[K, 0:cols]: a's rows lda apart, b's ldb, s's lds.
inline void Scores(const float* a, int64_t lda, int64_t K, const float* b, int64_t ldb, int64_t cols, float* s,
                   int64_t lds) {
  for (int64_t j = 0; j < cols; j += NB) Kernel(a, lda, 1, b + j, K, ldb, s + j, lds, false);
}

// c[MR, N] = a[MR, 0:K] b[K, N]: a's rows lda apart, b's ldb, c's ldc.
inline void RowBlockTimes(const float* a, int64_t lda, int64_t K, const float* b, int64_t ldb, int64_t N, float* c,
                          int64_t ldc) {
  for (int64_t j = 0; j < N; j += NB) Kernel(a, lda, 1, b + j, K, ldb, c + j, ldc, false);
}

// c[MR, N] += a[0:K, MR]^T b[K, N]: a's rows lda apart (the MR columns of a probability or score block), b's ldb,
// c's ldc.
inline void AddColumnTimes(const float* a, int64_t lda, int64_t K, const float* b, int64_t ldb, int64_t N,
                           float* c, int64_t ldc) {
  for (int64_t j = 0; j < N; j += NB) Kernel(a, 1, lda, b + j, K, ldb, c + j, ldc, true);
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

// The sizes of q [B, T, K, Q, Z], k [B, T, K, Z], v [B, T, K, Y], and where task h = (b, key head) and its query
// heads start in each operand (rows of q and out lie sq and so floats apart, of k and v sk and sv).
struct Layout {
  int64_t B, T, K, Q, Z, Y;
  int64_t sq() const { return K * Q * Z; }
  int64_t so() const { return K * Q * Y; }
  int64_t sk() const { return K * Z; }
  int64_t sv() const { return K * Y; }
  int64_t Q0(int64_t h, int64_t qi) const { return (h / K) * T * sq() + ((h % K) * Q + qi) * Z; }
  int64_t O0(int64_t h, int64_t qi) const { return (h / K) * T * so() + ((h % K) * Q + qi) * Y; }
  int64_t K0(int64_t h) const { return (h / K) * T * sk() + (h % K) * Z; }
  int64_t V0(int64_t h) const { return (h / K) * T * sv() + (h % K) * Y; }
  int64_t L0(int64_t h, int64_t qi) const { return (h * Q + qi) * T; }  // lse [B, K, Q, T]
};

// s = the layout of q, k, v; an error when the call does not take them.
ffi::Error Check(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                 Layout& s) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q must be [B, T, K, Q, Z], k [B, U, K, Z], v [B, U, K, Y]");
  s = Layout{qd[0], qd[1], qd[2], qd[3], qd[4], vd[3]};
  if (kd[0] != s.B || kd[1] != s.T || kd[2] != s.K || kd[3] != s.Z || vd[0] != s.B || vd[1] != s.T || vd[2] != s.K)
    return ffi::Error::InvalidArgument("attention: k and v must match q's batch, positions (U = T) and heads");
  if (s.T % NB || s.Z % NB || s.Y % NB)
    return ffi::Error::InvalidArgument("attention: positions and head widths must be multiples of 32");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Layout l;
  if (ffi::Error error = Check(q, k, v, l); error.failure()) return error;
  const int64_t T = l.T, Z = l.Z, Y = l.Y, sq = l.sq(), so = l.so(), sv = l.sv();
  ForEach(pool, l.B * l.K, [&](int64_t h) {
    std::vector<float> kT(Z * T), s(MR * T);
    Transpose(k.typed_data() + l.K0(h), T, Z, kT.data(), l.sk());
    const float* vh = v.typed_data() + l.V0(h);
    for (int64_t qi = 0; qi < l.Q; ++qi) {
      const float* qh = q.typed_data() + l.Q0(h, qi);
      float *oh = out->typed_data() + l.O0(h, qi), *lh = lse->typed_data() + l.L0(h, qi);
      for (int64_t m = 0; m < T; m += MR) {
        const int64_t cols = Cols(m);
        Scores(qh + m * sq, sq, Z, kT.data(), T, cols, s.data(), T);
        for (int r = 0; r < MR; ++r) lh[m + r] = SoftmaxRow(s.data() + r * T, m + r, cols, scale);
        RowBlockTimes(s.data(), T, m + MR, vh, sv, Y, oh + m * so, so);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Layout l;
  if (ffi::Error error = Check(q, k, v, l); error.failure()) return error;
  const int64_t T = l.T, Z = l.Z, Y = l.Y, sq = l.sq(), so = l.so(), sk = l.sk(), sv = l.sv();
  ForEach(pool, l.B * l.K, [&](int64_t h) {
    std::vector<float> kT(Z * T), vT(Y * T), p(G * T), ds(G * T), delta(G);
    const float *kh = k.typed_data() + l.K0(h), *vh = v.typed_data() + l.V0(h);
    Transpose(kh, T, Z, kT.data(), sk);
    Transpose(vh, T, Y, vT.data(), sv);
    float *dkh = dk->typed_data() + l.K0(h), *dvh = dv->typed_data() + l.V0(h);
    for (int64_t t = 0; t < T; ++t) {
      std::memset(dkh + t * sk, 0, Z * sizeof(float));
      std::memset(dvh + t * sv, 0, Y * sizeof(float));
    }
    for (int64_t qi = 0; qi < l.Q; ++qi) {
      const float *qh = q.typed_data() + l.Q0(h, qi), *oh = out.typed_data() + l.O0(h, qi);
      const float *doh = dout.typed_data() + l.O0(h, qi), *lh = lse.typed_data() + l.L0(h, qi);
      float* dqh = dq->typed_data() + l.Q0(h, qi);
      for (int64_t g0 = 0; g0 < T; g0 += G) {
        const int64_t end = std::min<int64_t>(g0 + G, T);
        for (int64_t t = g0; t < end; ++t) {
          V acc = V{};
          for (int64_t c = 0; c < Y; c += L) acc += Load(doh + t * so + c) * Load(oh + t * so + c);
          delta[t - g0] = 0.f;
          for (int i = 0; i < L; ++i) delta[t - g0] += acc[i];
        }
        for (int64_t m = g0; m < end; m += MR) {
          const int64_t cols = Cols(m);
          float *pm = p.data() + (m - g0) * T, *dsm = ds.data() + (m - g0) * T;
          Scores(qh + m * sq, sq, Z, kT.data(), T, cols, pm, T);
          Scores(doh + m * so, so, Y, vT.data(), T, cols, dsm, T);
          for (int r = 0; r < MR; ++r)
            BackwardRow(pm + r * T, dsm + r * T, m + r, cols, scale, lh[m + r], delta[m - g0 + r]);
          RowBlockTimes(dsm, T, m + MR, kh, sk, Z, dqh + m * sq, sq);
        }
        // Key block u0 gets the group's rows t >= u0 (earlier rows do not see it); their entries are computed
        // (zeros where masked) since t's row block scored keys past t's own block.
        for (int64_t u0 = 0; u0 < end; u0 += MR) {
          const int64_t t0 = std::max(g0, u0);
          AddColumnTimes(ds.data() + (t0 - g0) * T + u0, T, end - t0, qh + t0 * sq, sq, Z, dkh + u0 * sk, sk);
          AddColumnTimes(p.data() + (t0 - g0) * T + u0, T, end - t0, doh + t0 * so, so, Y, dvh + u0 * sv, sv);
        }
      }
    }
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace

// Forward returns out [B, T, K, Q, Y] and the logsumexp of each query's scaled scores [B, K, Q, T]; the backward
// takes them with dout and returns dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionFwd, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Attr<float>("scale").Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionBwd, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()  // out, lse, dout
                                  .Attr<float>("scale").Ret<F32>().Ret<F32>().Ret<F32>());
