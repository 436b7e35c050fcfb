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
#include <type_traits>

#include "products.h"

namespace {

constexpr int G = 64;  // query rows a backward group: the key and value gradients' products run over a group's rows

// Keys a block of MR query rows from m scores against: [0, m + MR) rounded up to whole product kernels.
inline int64_t Cols(int64_t m) { return (m + MR + NB - 1) / NB * NB; }

// s[MR, cols] = a[MR, K] b[K, 0:cols]: b's and s's rows ld apart (the full key length).
inline void Scores(const float* a, int64_t K, const float* b, int64_t ld, int64_t cols, float* s) {
  for (int64_t j = 0; j < cols; j += NB) Kernel(a, K, 1, b + j, K, ld, s + j, ld, false);
}

const VI kLane = [] { VI lane; for (int i = 0; i < L; ++i) lane[i] = i; return lane; }();  // 0, 1, ... L - 1
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
template <typename Buf>
ffi::Error Check(const Buf& q, const Buf& k, const Buf& v, Layout& s) {
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

// dst [rows, cols] (f32, contiguous) = src's rows, lds apart (bf16 widened: products.h's Widen; cols a multiple
// of 32, as Check requires).
template <typename In>
inline void ReadRows(const In* src, int64_t rows, int64_t cols, int64_t lds, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += L) Store(dst + r * cols + c, Widen(src + r * lds + c));
}

// dst's rows, ldd apart = src [rows, cols] (f32), in dst's type (bf16 rounded once: products.h's Put).
template <typename Out>
inline void WriteRows(const float* src, int64_t rows, int64_t cols, Out* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += L) Put(Load(src + r * cols + c), dst + r * ldd + c);
}

// Each task reads its operands into contiguous f32 copies (bf16 operands converted as they are read: no f32 copy
// of the whole tensor is made outside the call) and writes its results back in the operands' type.
template <typename In>
void Forward(ffi::ThreadPool& pool, const In* q, const In* k, const In* v, const Layout& l, float scale, In* out,
             float* lse) {
  const int64_t T = l.T, Z = l.Z, Y = l.Y;
  ForEach(pool, l.B * l.K, [&](int64_t h) {
    Scratch& scratch = Scratch::ForTask();
    float *kf = scratch.Take<float>(T * Z), *kT = scratch.Take<float>(Z * T), *vf = scratch.Take<float>(T * Y),
          *qf = scratch.Take<float>(T * Z), *s = scratch.Take<float>(MR * T), *ob = scratch.Take<float>(MR * Y);
    ReadRows(k + l.K0(h), T, Z, l.sk(), kf);
    Transpose(kf, T, Z, kT);
    ReadRows(v + l.V0(h), T, Y, l.sv(), vf);
    for (int64_t qi = 0; qi < l.Q; ++qi) {
      ReadRows(q + l.Q0(h, qi), T, Z, l.sq(), qf);
      In* oh = out + l.O0(h, qi);
      float* lh = lse + l.L0(h, qi);
      for (int64_t m = 0; m < T; m += MR) {
        const int64_t cols = Cols(m);
        Scores(qf + m * Z, Z, kT, T, cols, s);
        for (int r = 0; r < MR; ++r) lh[m + r] = SoftmaxRow(s + r * T, m + r, cols, scale);
        Times(s, T, 1, MR, m + MR, vf, Y, ob, false);  // out rows
        WriteRows(ob, MR, Y, oh + m * l.so(), l.so());
      }
    }
  });
}

template <typename In>
void Backward(ffi::ThreadPool& pool, const In* q, const In* k, const In* v, const In* out, const float* lse,
              const In* dout, const Layout& l, float scale, In* dq, In* dk, In* dv) {
  const int64_t T = l.T, Z = l.Z, Y = l.Y;
  ForEach(pool, l.B * l.K, [&](int64_t h) {
    Scratch& scratch = Scratch::ForTask();
    float *kf = scratch.Take<float>(T * Z), *vf = scratch.Take<float>(T * Y), *kT = scratch.Take<float>(Z * T),
          *vT = scratch.Take<float>(Y * T), *qf = scratch.Take<float>(T * Z), *of = scratch.Take<float>(T * Y),
          *dof = scratch.Take<float>(T * Y), *dqb = scratch.Take<float>(MR * Z), *dkf = scratch.Take<float>(T * Z),
          *dvf = scratch.Take<float>(T * Y), *p = scratch.Take<float>(G * T), *ds = scratch.Take<float>(G * T),
          *delta = scratch.Take<float>(G);
    std::fill(dkf, dkf + T * Z, 0.f);  // summed over the query blocks
    std::fill(dvf, dvf + T * Y, 0.f);
    ReadRows(k + l.K0(h), T, Z, l.sk(), kf);
    ReadRows(v + l.V0(h), T, Y, l.sv(), vf);
    Transpose(kf, T, Z, kT);
    Transpose(vf, T, Y, vT);
    for (int64_t qi = 0; qi < l.Q; ++qi) {
      ReadRows(q + l.Q0(h, qi), T, Z, l.sq(), qf);
      ReadRows(out + l.O0(h, qi), T, Y, l.so(), of);
      ReadRows(dout + l.O0(h, qi), T, Y, l.so(), dof);
      const float* lh = lse + l.L0(h, qi);
      In* dqh = dq + l.Q0(h, qi);
      for (int64_t g0 = 0; g0 < T; g0 += G) {
        const int64_t end = std::min<int64_t>(g0 + G, T);
        for (int64_t t = g0; t < end; ++t) {
          V acc = V{};
          for (int64_t c = 0; c < Y; c += L) acc += Load(dof + t * Y + c) * Load(of + t * Y + c);
          delta[t - g0] = 0.f;
          for (int i = 0; i < L; ++i) delta[t - g0] += acc[i];
        }
        for (int64_t m = g0; m < end; m += MR) {
          const int64_t cols = Cols(m);
          float *pm = p + (m - g0) * T, *dsm = ds + (m - g0) * T;
          Scores(qf + m * Z, Z, kT, T, cols, pm);
          Scores(dof + m * Y, Y, vT, T, cols, dsm);
          for (int r = 0; r < MR; ++r)
            BackwardRow(pm + r * T, dsm + r * T, m + r, cols, scale, lh[m + r], delta[m - g0 + r]);
          Times(dsm, T, 1, MR, m + MR, kf, Z, dqb, false);  // dq rows
          WriteRows(dqb, MR, Z, dqh + m * l.sq(), l.sq());
        }
        // Key block u0 gets the group's rows t >= u0 (earlier rows do not see it); their entries are computed
        // (zeros where masked) since t's row block scored keys past t's own block.
        for (int64_t u0 = 0; u0 < end; u0 += MR) {
          const int64_t t0 = std::max(g0, u0);
          const float *ds_t = ds + (t0 - g0) * T + u0, *p_t = p + (t0 - g0) * T + u0;
          Times(ds_t, 1, T, MR, end - t0, qf + t0 * Z, Z, dkf + u0 * Z, true);  // ds^T q
          Times(p_t, 1, T, MR, end - t0, dof + t0 * Y, Y, dvf + u0 * Y, true);  // p^T dout
        }
      }
    }
    WriteRows(dkf, T, Z, dk + l.K0(h), l.sk());
    WriteRows(dvf, T, Y, dv + l.V0(h), l.sv());
  });
}

template <ffi::DataType DT>
using In = ffi::Buffer<DT>;
template <ffi::DataType DT>
using Out = ffi::ResultBuffer<DT>;
using F32 = ffi::Buffer<ffi::F32>;

template <ffi::DataType DT>
ffi::Error ForwardCall(ffi::ThreadPool pool, In<DT> q, In<DT> k, In<DT> v, float scale, Out<DT> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  Layout l;
  if (ffi::Error error = Check(q, k, v, l); error.failure()) return error;
  Forward(pool, Data(q), Data(k), Data(v), l, scale, Data(out), lse->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error BackwardCall(ffi::ThreadPool pool, In<DT> q, In<DT> k, In<DT> v, In<DT> out, F32 lse, In<DT> dout,
                        float scale, Out<DT> dq, Out<DT> dk, Out<DT> dv) {
  Layout l;
  if (ffi::Error error = Check(q, k, v, l); error.failure()) return error;
  Backward(pool, Data(q), Data(k), Data(v), Data(out), lse.typed_data(), Data(dout), l, scale, Data(dq), Data(dk),
           Data(dv));
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto BindForward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<In<DT>>().template Arg<In<DT>>()
      .template Arg<In<DT>>().template Attr<float>("scale").template Ret<ffi::Buffer<DT>>().template Ret<F32>();
}

template <ffi::DataType DT>
auto BindBackward() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<In<DT>>().template Arg<In<DT>>()
      .template Arg<In<DT>>().template Arg<In<DT>>().template Arg<F32>().template Arg<In<DT>>()  // out, lse, dout
      .template Attr<float>("scale").template Ret<ffi::Buffer<DT>>().template Ret<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>();
}

}  // namespace

// Forward returns out [B, T, K, Q, Y] (q's type) and the logsumexp of each query's scaled scores [B, K, Q, T]
// (f32); the backward takes them with dout and returns dq, dk, dv. f32 and bf16 operands (bf16 read into f32
// copies task by task, results rounded once).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionFwd, ForwardCall<ffi::F32>, BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionBwd, BackwardCall<ffi::F32>, BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionFwdBf16, ForwardCall<ffi::BF16>, BindForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SlmjaxAttentionBwdBf16, BackwardCall<ffi::BF16>, BindBackward<ffi::BF16>());
