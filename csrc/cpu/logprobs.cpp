// Token log-probabilities and entropy from logits, one streaming pass per row.
//   logp[r] = log_softmax(z[r])[t[r]],  ent[r] = entropy(softmax(z[r])),  z = logit_z(x) (common.h):
//   x * inv_temp, or with softcap (cap_pre != 0) tanh(x * cap_pre) * inv_temp.
// Backward writes grad_x only (optionally into x's own storage). A non-finite row gives NaN logp,
// lse and entropy, and a NaN gradient unless both upstream grads of the row are 0: then the row
// of grad_x is exactly 0 (masked rows: no 0 * NaN).
#include <chrono>

#include "common.h"
#include "kl_estimators.h"

namespace rlhf_fast {
namespace {

template <typename T, bool kEntropy>
RLHF_FAST_HOT_FN RowStats logprobs_row(const T* x, int64_t V, float inv_temp) {
  return row_stats<T, kEntropy>(x, V, inv_temp);
}

// The same with the softcap: a separate function (not a template flag) keeps the plain one's symbol
template <typename T, bool kEntropy>
RLHF_FAST_HOT_FN RowStats logprobs_cap_row(const T* x, int64_t V, float inv_temp, float cap_pre) {
  return row_stats<T, kEntropy, true>(x, V, inv_temp, cap_pre);
}

template <typename T, bool kEntropy>
inline RowStats logprobs_stats(const T* x, int64_t V, float inv_temp, float cap_pre) {
  return cap_pre != 0.0f ? logprobs_cap_row<T, kEntropy>(x, V, inv_temp, cap_pre)
                         : logprobs_row<T, kEntropy>(x, V, inv_temp);
}

// grad_x[j] = inv_temp * (g_lp * ([j == t] - p_j) - g_ent * p_j * (z_j - lse + H)),  p_j = exp(z_j - lse)
template <typename T, bool kEntropy>
inline float logprobs_grad(float z, float lse, float shift, float g_lp, float g_ent, float onehot) {
  float p = fast_exp(z - lse);
  float g = g_lp * (onehot - p);
  if (kEntropy) g -= p > 0.0f ? g_ent * p * (z + shift) : 0.0f;
  return g;
}

// The same at j != t as one product, for the row loops: g_j = p_j * (a z_j + b) with a = -g_ent and
// b = -(g_lp + g_ent * shift) (times the chain factor the caller folds in); without the entropy a = 0 and
// g_j = p_j * b. p_j = 0 gives 0 (z_j = -inf: no 0 * inf), NaN stays NaN. One multiply-add and a select
// more than the entropy-off loop, where the three-term form above cost three multiplies and a select.
template <bool kEntropy>
inline float logprobs_grad_rest(float z, float lse, float a, float b) {
  const float p = fast_exp(z - lse);
  if constexpr (kEntropy) {
    const float t = a * z + b;
    return p != 0.0f ? p * t : 0.0f;
  }
  return p * b;
}

template <typename T, bool kEntropy>
RLHF_FAST_HOT_FN void logprobs_bwd_row(const T* x, T* gx, int64_t V, int64_t t, float inv_temp, float lse,
                                       float ent, float g_lp, float g_ent) {
  const float shift = ent - lse;
  const float z_t = load_f32(x, t) * inv_temp;  // read before the loop: gx may alias x
  const float a = -g_ent * inv_temp, b = -(g_lp + (kEntropy ? g_ent * shift : 0.0f)) * inv_temp;
  const float g_t = inv_temp * logprobs_grad<T, kEntropy>(z_t, lse, shift, g_lp, g_ent, 1.0f);
  if constexpr (std::is_same_v<T, half_t>) {
    if (cpu_has_f16c()) {  // chunk by chunk through an fp32 buffer: F16C widening and rounding
      alignas(64) float buf[kChunk];
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
        widen_f16(x + c0, buf, n);  // the whole chunk is read before any of it is written
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) buf[j] = logprobs_grad_rest<kEntropy>(buf[j] * inv_temp, lse, a, b);
        narrow_f16(buf, gx + c0, n);
      }
      store_f32(gx, t, g_t);
      return;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {  // element j is read before it is written
    store_f32(gx, j, logprobs_grad_rest<kEntropy>(load_f32(x, j) * inv_temp, lse, a, b));
  }
  store_f32(gx, t, g_t);
}

// With the softcap: grad_x[j] = grad_z[j] * inv_temp * cap_pre * (1 - tanh(x_j * cap_pre)^2)
template <typename T, bool kEntropy>
RLHF_FAST_HOT_FN void logprobs_cap_bwd_row(const T* x, T* gx, int64_t V, int64_t t, float inv_temp, float cap_pre,
                                           float lse, float ent, float g_lp, float g_ent) {
  const float shift = ent - lse, dz = inv_temp * cap_pre;
  const float th_t = fast_tanh(load_f32(x, t) * cap_pre);  // read before the loop: gx may alias x
  const float a = -g_ent, b = -(g_lp + (kEntropy ? g_ent * shift : 0.0f));
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {  // element j is read before it is written
    const float th = fast_tanh(load_f32(x, j) * cap_pre);
    const float g = logprobs_grad_rest<kEntropy>(th * inv_temp, lse, a, b);
    store_f32(gx, j, g * (dz * (1.0f - th * th)));
  }
  const float g_t = logprobs_grad<T, kEntropy>(th_t * inv_temp, lse, shift, g_lp, g_ent, 1.0f);
  store_f32(gx, t, g_t * (dz * (1.0f - th_t * th_t)));
}

template <typename T, bool kEntropy>
inline void logprobs_bwd_any(const T* x, T* gx, int64_t V, int64_t t, float inv_temp, float cap_pre, float lse,
                             float ent, float g_lp, float g_ent) {
  if (cap_pre != 0.0f)
    logprobs_cap_bwd_row<T, kEntropy>(x, gx, V, t, inv_temp, cap_pre, lse, ent, g_lp, g_ent);
  else
    logprobs_bwd_row<T, kEntropy>(x, gx, V, t, inv_temp, lse, ent, g_lp, g_ent);
}

template <typename T>
RLHF_FAST_HOT_FN void zero_row(T* gx, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) store_f32(gx, j, 0.0f);
}

void logprobs_fwd(uintptr_t x_ptr, int dtype, int64_t inner, int64_t s_outer, int64_t s_inner,
                  uintptr_t t_ptr, int t_dtype, int64_t n_rows, int64_t V, float inv_temp, float cap_pre,
                  uintptr_t logp_ptr, uintptr_t lse_ptr, uintptr_t ent_ptr, int nthreads) {
  const RowLayout lay{inner, s_outer, s_inner};
  float* logp = reinterpret_cast<float*>(logp_ptr);
  float* lse_out = reinterpret_cast<float*>(lse_ptr);
  float* ent = reinterpret_cast<float*>(ent_ptr);
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = reinterpret_cast<const T*>(x_ptr);
#pragma omp parallel for schedule(dynamic, kRowsPerTask) num_threads(num_threads(nthreads))
    for (int64_t r = 0; r < n_rows; ++r) {
      const T* row = x + lay.offset(r);
      RowStats st = ent ? logprobs_stats<T, true>(row, V, inv_temp, cap_pre)
                        : logprobs_stats<T, false>(row, V, inv_temp, cap_pre);
      const float log_s = std::log(st.s);
      const int64_t t = load_index(t_ptr, t_dtype, r);
      float lp = (logit_z_any(load_f32(row, t), inv_temp, cap_pre) - st.m) - log_s;  // exact subtraction first
      logp[r] = lp > 0.0f ? 0.0f : lp;
      lse_out[r] = st.m + log_s;
      if (ent) ent[r] = st.entropy();
    }
  });
}

void logprobs_bwd(uintptr_t x_ptr, int dtype, int64_t inner, int64_t s_outer, int64_t s_inner,
                  uintptr_t gx_ptr, int64_t g_inner, int64_t g_s_outer, int64_t g_s_inner,
                  uintptr_t t_ptr, int t_dtype, int64_t n_rows, int64_t V, float inv_temp, float cap_pre,
                  uintptr_t lse_ptr, uintptr_t ent_ptr, uintptr_t g_lp_ptr, uintptr_t g_ent_ptr, int nthreads) {
  const RowLayout lay{inner, s_outer, s_inner};
  const RowLayout glay{g_inner, g_s_outer, g_s_inner};
  const float* lse = reinterpret_cast<const float*>(lse_ptr);
  const float* ent = reinterpret_cast<const float*>(ent_ptr);
  const float* g_lp = reinterpret_cast<const float*>(g_lp_ptr);
  const float* g_ent = reinterpret_cast<const float*>(g_ent_ptr);
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = reinterpret_cast<const T*>(x_ptr);
    T* gx = reinterpret_cast<T*>(gx_ptr);
#pragma omp parallel for schedule(dynamic, kRowsPerTask) num_threads(num_threads(nthreads))
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t t = load_index(t_ptr, t_dtype, r);
      const float gl = g_lp[r], ge = g_ent ? g_ent[r] : 0.0f;
      T* grow = gx + glay.offset(r);
      if (ge != 0.0f)
        logprobs_bwd_any<T, true>(x + lay.offset(r), grow, V, t, inv_temp, cap_pre, lse[r], ent[r], gl, ge);
      else if (gl != 0.0f)
        logprobs_bwd_any<T, false>(x + lay.offset(r), grow, V, t, inv_temp, cap_pre, lse[r], 0.0f, gl, 0.0f);
      else
        zero_row(grow, V);
    }
  });
}

// ---- benchmark floor ----------------------------------------------------------
// The row kernels are bound by their exp: this is the log-prob kernel's exp sum (common.h row_stats:
// clamp, exp_clamped, add) over one L1-resident chunk, without the memory traffic or the max, so
// n / seconds is the machine's exp throughput.
RLHF_FAST_HOT_FN float exp_chunk_sum(const float* buf, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float d = buf[j] - m;
    s += exp_clamped(d < kExpLo ? kExpLo : d);
  }
  return s;
}

volatile float exp_floor_sink = 0.0f;

double exp_floor_seconds(int64_t n, int nthreads) {
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0.0f;
#pragma omp parallel num_threads(num_threads(nthreads)) reduction(+ : sink)
  {
    alignas(64) float buf[kChunk];
    for (int64_t j = 0; j < kChunk; ++j) buf[j] = -0.013f * static_cast<float>(j);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n; c += kChunk) sink += exp_chunk_sum(buf, n - c < kChunk ? n - c : kChunk, 0.0f);
  }
  exp_floor_sink = sink;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The softcap's tanh on n floats (for tests/ops/test_logit_transforms.py's error bound).
void softcap_tanh(uintptr_t in_ptr, uintptr_t out_ptr, int64_t n) {
  const float* in = reinterpret_cast<const float*>(in_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = fast_tanh(in[i]);
}

// The kernels' exp on n fp32 values: fast_exp (any = false, for x <= kExpHi) or exp_wide, in the clone
// the kernels run (FMA or not changes the rounding), for tests/ops/test_cpu_exp.py.
RLHF_FAST_HOT_FN void exp_values(uintptr_t in_ptr, uintptr_t out_ptr, int64_t n, bool any) {
  const float* in = reinterpret_cast<const float*>(in_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  if (any)
    for (int64_t i = 0; i < n; ++i) out[i] = exp_wide(in[i]);
  else
    for (int64_t i = 0; i < n; ++i) out[i] = fast_exp(in[i]);
}

void register_logprobs(py::module_& m) {
  m.def("softcap_tanh", &softcap_tanh, "fast_tanh (the kernels' softcap tanh) of n fp32 values");
  m.def("exp_values", &exp_values, py::call_guard<py::gil_scoped_release>(),
        "fast_exp (any=False) or exp_wide (any=True), the kernels' exp, of n fp32 values");
  m.def("exp_floor_seconds", &exp_floor_seconds, py::call_guard<py::gil_scoped_release>(),
        "seconds for n of the kernels' vectorised exp (summed over one L1 chunk) on nthreads threads");
  m.def("logprobs_fwd", &logprobs_fwd, py::call_guard<py::gil_scoped_release>(),
        "logits rows -> (logp, lse, entropy?) written to the given fp32 buffers");
  m.def("logprobs_bwd", &logprobs_bwd, py::call_guard<py::gil_scoped_release>(),
        "grad of (logp, entropy) w.r.t. logits, written to grad rows (may alias the logits)");
}
RLHF_FAST_REGISTER(register_logprobs);

}  // namespace
}  // namespace rlhf_fast
