// KL on CPU (semantics: rlhf_fast/ops/kl.py *_ref).
//   kl_penalty: elementwise estimators of d = logp - ref_logp (kl_estimators.h) and their gradient.
//   full_kl:    exact KL(softmax(z) || softmax(z')) per row, z = logit_z(x), z' = logit_z(y) (common.h: x * inv_temp,
//               or with softcap tanh(x * cap_pre) * inv_temp), in one
//               streaming pass over both rows. Online statistics: m = max z, s = sum exp(z - m),
//               m' = max z', s' = sum exp(z' - m'), w = sum exp(z - m) ((z - m) - (z' - m')):
//               KL = w / s - (log s - log s').  Backward: dKL/dz_j = p_j (log p_j - log q_j - KL).
#include <type_traits>

#include "common.h"
#include "kl_estimators.h"

namespace rlhf_fast {
namespace {

// ---- kl_penalty ---------------------------------------------------------------
template <int kEst, typename A, typename B>
RLHF_FAST_HOT_FN void kl_penalty_loop(const A* a, const B* b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = kl_est_value(load_f32(a, i) - load_f32(b, i), kEst);
}

template <int kEst, typename A, typename B>
RLHF_FAST_HOT_FN void kl_penalty_grad_loop(const A* a, const B* b, const float* g, A* ga, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_f32(ga, i, g[i] * kl_est_grad(load_f32(a, i) - load_f32(b, i), kEst));
}

template <typename Fn>
inline void dispatch_est(int est, Fn&& fn) {
  switch (est) {
    case 0: fn(std::integral_constant<int, 0>{}); break;
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: throw std::invalid_argument("rlhf_fast._C: unknown KL estimator code " + std::to_string(est));
  }
}

constexpr int64_t kElemChunk = 1 << 14;  // elementwise loops: parallel over chunks of this many

void kl_penalty_fwd(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, uintptr_t out_ptr, int64_t n,
                    int est, int nthreads) {
  float* out = reinterpret_cast<float*>(out_ptr);
  dispatch_est(est, [&](auto e) {
    dispatch_float(a_dtype, [&](auto* at) {
      dispatch_float(b_dtype, [&](auto* bt) {
        using A = std::remove_pointer_t<decltype(at)>;
        using B = std::remove_pointer_t<decltype(bt)>;
        const A* a = reinterpret_cast<const A*>(a_ptr);
        const B* b = reinterpret_cast<const B*>(b_ptr);
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (n > kElemChunk)
        for (int64_t c = 0; c < n; c += kElemChunk)
          kl_penalty_loop<decltype(e)::value>(a + c, b + c, out + c, std::min(kElemChunk, n - c));
      });
    });
  });
}

// grad_a = g * d(estimator)/dd, in a's dtype.
void kl_penalty_bwd(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, uintptr_t g_ptr, uintptr_t ga_ptr,
                    int64_t n, int est, int nthreads) {
  const float* g = reinterpret_cast<const float*>(g_ptr);
  dispatch_est(est, [&](auto e) {
    dispatch_float(a_dtype, [&](auto* at) {
      dispatch_float(b_dtype, [&](auto* bt) {
        using A = std::remove_pointer_t<decltype(at)>;
        using B = std::remove_pointer_t<decltype(bt)>;
        const A* a = reinterpret_cast<const A*>(a_ptr);
        const B* b = reinterpret_cast<const B*>(b_ptr);
        A* ga = reinterpret_cast<A*>(ga_ptr);
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (n > kElemChunk)
        for (int64_t c = 0; c < n; c += kElemChunk)
          kl_penalty_grad_loop<decltype(e)::value>(a + c, b + c, g + c, ga + c, std::min(kElemChunk, n - c));
      });
    });
  });
}

// ---- full_kl ------------------------------------------------------------------
struct KLStats {
  float m = kNegInf, s = 0.0f, w = 0.0f;  // z: max, sum exp(z - m), sum exp(z - m) ((z - m) - (z' - m'))
  float mq = kNegInf, sq = 0.0f;          // z': max m', sum exp(z' - m')
};

inline float finite_or_zero(float m) { return m == kNegInf ? 0.0f : m; }

// Streams one pair of rows chunk by chunk, software-pipelined as row_stats (common.h): the next chunk
// of both rows is read into one pair of L1 buffers while the other pair is summed.
// z and z' are measured from their own running maxima, so w has no cancellation for large logits.
template <typename X, typename Y, bool kCap>
inline KLStats full_kl_stats(const X* x, const Y* y, int64_t V, float inv_temp, float cap_pre) {
  constexpr int64_t C = kChunk / 2;  // four buffers
  KLStats st;
  alignas(64) float bz[2][C], bq[2][C];
  int64_t n = V < C ? V : C;
  float zmax = load_chunk<X, kCap>(x, n, inv_temp, cap_pre, bz[0], kNegInf);
  float qmax = load_chunk<Y, kCap>(y, n, inv_temp, cap_pre, bq[0], kNegInf);
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += C, ++k) {
    const int64_t c1 = c0 + C, nn = c1 >= V ? 0 : (V - c1 < C ? V - c1 : C);
    const float m_new = zmax > st.m ? zmax : st.m, mq_new = qmax > st.mq ? qmax : st.mq;
    const float ms_old = finite_or_zero(st.m), mqs_old = finite_or_zero(st.mq);
    const float mz = finite_or_zero(m_new), mq = finite_or_zero(mq_new);
    if (st.s > 0.0f) {  // re-measure the old terms from the new maxima
      const float alpha = std::exp(st.m - mz);
      st.w = alpha * (st.w + st.s * ((ms_old - mz) - (mqs_old - mq)));
      st.s *= alpha;
    }
    if (st.sq > 0.0f) st.sq *= std::exp(st.mq - mq);
    st.m = m_new;
    st.mq = mq_new;
    const float *cz = bz[k & 1], *cq = bq[k & 1];
    float *nz = bz[(k + 1) & 1], *nq = bq[(k + 1) & 1];
    const X* xn = x + (nn ? c1 : 0);
    const Y* yn = y + (nn ? c1 : 0);
    float s = 0.0f, w = 0.0f, sq = 0.0f, nzmax = kNegInf, nqmax = kNegInf;
#pragma omp simd reduction(+ : s, w, sq) reduction(max : nzmax, nqmax)
    for (int64_t j = 0; j < nn; ++j) {
      const float z = cz[j] - mz, q = cq[j] - mq;
      const float e = fast_exp(z);
      s += e;
      w += e > 0.0f ? e * (z - q) : 0.0f;  // e = 0 at z = -inf: no 0 * inf
      sq += fast_exp(q);
      const float zn = logit_z<kCap>(load_f32(xn, j), inv_temp, cap_pre);
      const float qn = logit_z<kCap>(load_f32(yn, j), inv_temp, cap_pre);
      nz[j] = zn;
      nq[j] = qn;
      nzmax = zn > nzmax ? zn : nzmax;
      nqmax = qn > nqmax ? qn : nqmax;
    }
#pragma omp simd reduction(+ : s, w, sq)
    for (int64_t j = nn; j < n; ++j) {
      const float z = cz[j] - mz, q = cq[j] - mq;
      const float e = fast_exp(z);
      s += e;
      w += e > 0.0f ? e * (z - q) : 0.0f;
      sq += fast_exp(q);
    }
    st.s += s;
    st.w += w;
    st.sq += sq;
    zmax = nzmax;
    qmax = nqmax;
    n = nn;
  }
  return st;
}

template <typename X, typename Y>
RLHF_FAST_HOT_FN KLStats full_kl_row(const X* x, const Y* y, int64_t V, float inv_temp) {
  return full_kl_stats<X, Y, false>(x, y, V, inv_temp, 0.0f);
}

template <typename X, typename Y>  // the softcap's clone: a separate function keeps the plain one's symbol
RLHF_FAST_HOT_FN KLStats full_kl_cap_row(const X* x, const Y* y, int64_t V, float inv_temp, float cap_pre) {
  return full_kl_stats<X, Y, true>(x, y, V, inv_temp, cap_pre);
}

template <typename X>
RLHF_FAST_HOT_FN void zero_row(X* gx, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) store_f32(gx, j, 0.0f);
}

// grad_x[j] = g * inv_temp * p_j (log p_j - log q_j - kl),  log p_j = (z_j - m) - log s; kAcc: added to
// grad_x's values (the fused policy loss's "full" KL adds its gradient to the log-prob term's)
template <bool kAcc, typename X, typename Y>
RLHF_FAST_HOT_FN void full_kl_bwd_row(const X* x, const Y* y, X* gx, int64_t V, float inv_temp, float kl,
                                      const float* st, float g) {
  const float scale = g * inv_temp, m = st[0], log_s = st[1], mq = st[2], log_sq = st[3];
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float z = load_f32(x, j) * inv_temp, q = load_f32(y, j) * inv_temp;
    const float logp = (z - m) - log_s;
    const float p = fast_exp(logp);
    const float v = p > 0.0f ? scale * p * (logp - ((q - mq) - log_sq) - kl) : 0.0f;
    store_f32(gx, j, kAcc ? load_f32(gx, j) + v : v);
  }
}

// With the softcap: the same times dz/dx / inv_temp = cap_pre * (1 - tanh(x_j * cap_pre)^2)
template <bool kAcc, typename X, typename Y>
RLHF_FAST_HOT_FN void full_kl_cap_bwd_row(const X* x, const Y* y, X* gx, int64_t V, float inv_temp, float cap_pre,
                                          float kl, const float* st, float g) {
  const float scale = g * inv_temp * cap_pre, m = st[0], log_s = st[1], mq = st[2], log_sq = st[3];
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float th = fast_tanh(load_f32(x, j) * cap_pre);
    const float z = th * inv_temp, q = logit_z<true>(load_f32(y, j), inv_temp, cap_pre);
    const float logp = (z - m) - log_s;
    const float p = fast_exp(logp);
    const float v = p > 0.0f ? (scale * (1.0f - th * th)) * p * (logp - ((q - mq) - log_sq) - kl) : 0.0f;
    store_f32(gx, j, kAcc ? load_f32(gx, j) + v : v);
  }
}

// kl (N,) fp32; stats (N, 4) fp32: m, log s, m', log s' (for backward)
void full_kl_fwd(uintptr_t x_ptr, int x_dtype, int64_t x_inner, int64_t x_so, int64_t x_si,
                 uintptr_t y_ptr, int y_dtype, int64_t y_inner, int64_t y_so, int64_t y_si,
                 int64_t n_rows, int64_t V, float inv_temp, float cap_pre, uintptr_t kl_ptr, uintptr_t stats_ptr,
                 int nthreads) {
  const RowLayout xl{x_inner, x_so, x_si}, yl{y_inner, y_so, y_si};
  float* kl = reinterpret_cast<float*>(kl_ptr);
  float* stats = reinterpret_cast<float*>(stats_ptr);
  dispatch_float(x_dtype, [&](auto* xt) {
    dispatch_float(y_dtype, [&](auto* yt) {
      using X = std::remove_pointer_t<decltype(xt)>;
      using Y = std::remove_pointer_t<decltype(yt)>;
      const X* x = reinterpret_cast<const X*>(x_ptr);
      const Y* y = reinterpret_cast<const Y*>(y_ptr);
#pragma omp parallel for schedule(dynamic, kRowsPerTask) num_threads(num_threads(nthreads)) if (n_rows * V >= kElemChunk)
      for (int64_t r = 0; r < n_rows; ++r) {
        const KLStats st = cap_pre != 0.0f ? full_kl_cap_row(x + xl.offset(r), y + yl.offset(r), V, inv_temp, cap_pre)
                                           : full_kl_row(x + xl.offset(r), y + yl.offset(r), V, inv_temp);
        const float log_s = std::log(st.s), log_sq = std::log(st.sq);
        kl[r] = st.w / st.s - (log_s - log_sq);
        stats[4 * r] = st.m;
        stats[4 * r + 1] = log_s;
        stats[4 * r + 2] = st.mq;
        stats[4 * r + 3] = log_sq;
      }
    });
  });
}

template <bool kAcc, typename X, typename Y>
void full_kl_bwd_rows(const X* x, RowLayout xl, const Y* y, RowLayout yl, X* gx, RowLayout gl, int64_t n_rows,
                      int64_t V, float inv_temp, float cap_pre, const float* kl, const float* stats, const float* g,
                      int nthreads) {
#pragma omp parallel for schedule(dynamic, kRowsPerTask) num_threads(num_threads(nthreads)) if (n_rows * V >= kElemChunk)
  for (int64_t r = 0; r < n_rows; ++r) {
    if (g[r] != 0.0f && cap_pre != 0.0f)
      full_kl_cap_bwd_row<kAcc>(x + xl.offset(r), y + yl.offset(r), gx + gl.offset(r), V, inv_temp, cap_pre, kl[r],
                                stats + 4 * r, g[r]);
    else if (g[r] != 0.0f)
      full_kl_bwd_row<kAcc>(x + xl.offset(r), y + yl.offset(r), gx + gl.offset(r), V, inv_temp, kl[r],
                            stats + 4 * r, g[r]);
    else if (!kAcc)  // a masked row: exactly 0 (or left as it is), even where the row is non-finite
      zero_row(gx + gl.offset(r), V);
  }
}

void full_kl_bwd(uintptr_t x_ptr, int x_dtype, int64_t x_inner, int64_t x_so, int64_t x_si,
                 uintptr_t y_ptr, int y_dtype, int64_t y_inner, int64_t y_so, int64_t y_si,
                 uintptr_t gx_ptr, int64_t g_inner, int64_t g_so, int64_t g_si,
                 int64_t n_rows, int64_t V, float inv_temp, float cap_pre, uintptr_t kl_ptr, uintptr_t stats_ptr,
                 uintptr_t g_ptr, bool accumulate, int nthreads) {
  const RowLayout xl{x_inner, x_so, x_si}, yl{y_inner, y_so, y_si}, gl{g_inner, g_so, g_si};
  const float* kl = reinterpret_cast<const float*>(kl_ptr);
  const float* stats = reinterpret_cast<const float*>(stats_ptr);
  const float* g = reinterpret_cast<const float*>(g_ptr);
  dispatch_float(x_dtype, [&](auto* xt) {
    dispatch_float(y_dtype, [&](auto* yt) {
      using X = std::remove_pointer_t<decltype(xt)>;
      using Y = std::remove_pointer_t<decltype(yt)>;
      const X* x = reinterpret_cast<const X*>(x_ptr);
      const Y* y = reinterpret_cast<const Y*>(y_ptr);
      X* gx = reinterpret_cast<X*>(gx_ptr);
      if (accumulate)
        full_kl_bwd_rows<true>(x, xl, y, yl, gx, gl, n_rows, V, inv_temp, cap_pre, kl, stats, g, nthreads);
      else
        full_kl_bwd_rows<false>(x, xl, y, yl, gx, gl, n_rows, V, inv_temp, cap_pre, kl, stats, g, nthreads);
    });
  });
}

void register_kl(py::module_& m) {
  m.def("kl_penalty_fwd", &kl_penalty_fwd, py::call_guard<py::gil_scoped_release>(),
        "elementwise KL estimator of logp - ref_logp (fp32 out)");
  m.def("kl_penalty_bwd", &kl_penalty_bwd, py::call_guard<py::gil_scoped_release>(),
        "grad of the KL estimator w.r.t. logp, in logp's dtype");
  m.def("full_kl_fwd", &full_kl_fwd, py::call_guard<py::gil_scoped_release>(),
        "exact per-row KL(softmax(x/T) || softmax(y/T)), with (m, log s, m', log s') for backward");
  m.def("full_kl_bwd", &full_kl_bwd, py::call_guard<py::gil_scoped_release>(),
        "grad of full_kl w.r.t. x, written to (accumulate: added to) grad rows");
}
RLHF_FAST_REGISTER(register_kl);

}  // namespace
}  // namespace rlhf_fast
