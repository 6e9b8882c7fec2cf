// The advantage side of PPO / GRPO on CPU (semantics: rlhf_fast/ops/advantages.py *_ref).
//   advantages_fwd: per row, backwards in time over the valid positions: KL-shaped rewards,
//                   GAE, and the row's (count, mean, M2) of the advantages for whitening.
//   whiten_stats / whiten_apply: masked whitening (partial statistics merged in double).
//   group_advantages: GRPO / RLOO / Dr. GRPO group-relative advantages.
// Rows run in parallel (OpenMP); a row's recurrence is one backward loop.
#include <type_traits>
#include <utility>

#include "common.h"
#include "kl_estimators.h"

namespace rlhf_fast {
namespace {

// Below this many elements a parallel region costs more than it saves (thread wake-up,
// and on a loaded machine a worker that is not scheduled stalls the barrier).
constexpr int64_t kParallelMin = 1 << 15;

// Any dtype code as float; used where a loop is sequential anyway (the GAE recurrence).
inline float load_any(uintptr_t base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32: return reinterpret_cast<const float*>(base)[i];
    case kFloat16: return f16_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
    case kBFloat16: return bf16_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
    case kInt32: return static_cast<float>(reinterpret_cast<const int32_t*>(base)[i]);
    case kInt64: return static_cast<float>(reinterpret_cast<const int64_t*>(base)[i]);
    case kBool:
    case kUInt8: return static_cast<float>(reinterpret_cast<const uint8_t*>(base)[i]);
    default: throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
  }
}

// Typed loads for the vectorizable loops: floating types via load_f32, integers by value.
template <typename T> inline float load_val(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>)
    return load_f32(p, i);
  else
    return static_cast<float>(p[i]);
}

template <typename Fn>
inline void dispatch_any(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat16: fn(static_cast<half_t*>(nullptr)); break;
    case kBFloat16: fn(static_cast<bf16_t*>(nullptr)); break;
    case kInt32: fn(static_cast<int32_t*>(nullptr)); break;
    case kInt64: fn(static_cast<int64_t*>(nullptr)); break;
    case kBool:
    case kUInt8: fn(static_cast<uint8_t*>(nullptr)); break;
    default: throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
  }
}

inline void check_code(uintptr_t ptr, int dtype) {  // before a parallel region: no throwing inside one
  if (ptr != 0 && (dtype < kFloat32 || dtype > kUInt8))
    throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
}

struct Tensor2 {  // a (B, T) input: base address, dtype code, row stride (elements), unit stride along T
  uintptr_t ptr;
  int dtype;
  int64_t stride;
  float at(int64_t r, int64_t t) const { return load_any(ptr, dtype, r * stride + t); }
};

// Outputs (fp32, contiguous (B, T)) may be null: rew_out unless shaping, adv/ret unless GAE,
// stats ((B, 3) double: count, mean, M2 of the row's advantages) unless whitening follows.
void advantages_fwd(uintptr_t scores_ptr, int scores_dtype, int64_t /*scores_stride*/,
                    uintptr_t lp_ptr, int lp_dtype, int64_t lp_stride,
                    uintptr_t ref_ptr, int ref_dtype, int64_t ref_stride,
                    uintptr_t rew_ptr, int rew_dtype, int64_t rew_stride,
                    uintptr_t val_ptr, int val_dtype, int64_t val_stride,
                    uintptr_t mask_ptr, int mask_dtype, int64_t mask_stride,
                    int64_t B, int64_t T, double kl_coef, double gamma, double lam, int est,
                    uintptr_t rew_out_ptr, uintptr_t adv_ptr, uintptr_t ret_ptr, uintptr_t stats_ptr, int nthreads) {
  const bool shape = scores_ptr != 0, with_gae = val_ptr != 0;
  for (auto [p, c] : {std::pair{scores_ptr, scores_dtype}, {lp_ptr, lp_dtype}, {ref_ptr, ref_dtype},
                      {rew_ptr, rew_dtype}, {val_ptr, val_dtype}, {mask_ptr, mask_dtype}})
    check_code(p, c);
  const Tensor2 lp{lp_ptr, lp_dtype, lp_stride}, ref{ref_ptr, ref_dtype, ref_stride};
  const Tensor2 rew{rew_ptr, rew_dtype, rew_stride}, val{val_ptr, val_dtype, val_stride};
  const Tensor2 mask{mask_ptr, mask_dtype, mask_stride};
  float* rew_out = reinterpret_cast<float*>(rew_out_ptr);
  float* adv = reinterpret_cast<float*>(adv_ptr);
  float* ret = reinterpret_cast<float*>(ret_ptr);
  double* stats = reinterpret_cast<double*>(stats_ptr);
  const float coef = static_cast<float>(kl_coef), g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (B * T >= kParallelMin)
  for (int64_t r = 0; r < B; ++r) {
    const float score = shape ? load_any(scores_ptr, scores_dtype, r) : 0.0f;
    bool seen = false;
    float next_a = 0.0f, next_v = 0.0f;
    double n = 0.0, mean = 0.0, m2 = 0.0;  // Welford over the row's advantages
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t o = r * T + t;
      if (mask.at(r, t) == 0.0f) {
        if (shape) rew_out[o] = 0.0f;
        if (with_gae) adv[o] = ret[o] = 0.0f;
        continue;
      }
      float rw;
      if (shape) {
        rw = -coef * kl_est_value(lp.at(r, t) - ref.at(r, t), est);
        if (!seen) rw += score;  // the row's last valid position
        seen = true;
        rew_out[o] = rw;
      } else {
        rw = rew.at(r, t);
      }
      if (!with_gae) continue;
      const float v = val.at(r, t);
      const float a = rw + g * next_v - v + gl * next_a;
      adv[o] = a;
      ret[o] = a + v;
      next_a = a;
      next_v = v;
      if (stats) {
        n += 1.0;
        const double dlt = a - mean;
        mean += dlt / n;
        m2 += dlt * (a - mean);
      }
    }
    if (stats) {
      stats[3 * r] = n;
      stats[3 * r + 1] = mean;
      stats[3 * r + 2] = m2;
    }
  }
}

// Per chunk of kWhitenChunk elements of x (N,): (count, mean, M2) of its valid elements, to
// stats (ceil(N / kWhitenChunk), 3) double. One parallel pass; each chunk is re-read from cache.
constexpr int64_t kWhitenChunk = 1 << 14;

void whiten_stats(uintptr_t x_ptr, int x_dtype, uintptr_t mask_ptr, int mask_dtype, int64_t N, uintptr_t stats_ptr,
                  int nthreads) {
  double* stats = reinterpret_cast<double*>(stats_ptr);
  const int64_t P = (N + kWhitenChunk - 1) / kWhitenChunk;
  dispatch_float(x_dtype, [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    dispatch_any(mask_dtype, [&](auto* mt) {
      using M = std::remove_pointer_t<decltype(mt)>;
      const X* x = reinterpret_cast<const X*>(x_ptr);
      const M* m = reinterpret_cast<const M*>(mask_ptr);
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (P > 1)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lo = p * kWhitenChunk, hi = std::min(N, lo + kWhitenChunk);
        double n = 0.0, sum = 0.0;
#pragma omp simd reduction(+ : n, sum)
        for (int64_t i = lo; i < hi; ++i) {
          const bool ok = load_val(m, i) != 0.0f;
          n += ok ? 1.0 : 0.0;
          sum += ok ? static_cast<double>(load_f32(x, i)) : 0.0;
        }
        const double mean = n > 0.0 ? sum / n : 0.0;
        double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
        for (int64_t i = lo; i < hi; ++i) {
          const double dv = static_cast<double>(load_f32(x, i)) - mean;
          m2 += load_val(m, i) != 0.0f ? dv * dv : 0.0;
        }
        stats[3 * p] = n;
        stats[3 * p + 1] = mean;
        stats[3 * p + 2] = m2;
      }
    });
  });
}

// out[i] = mask[i] ? (x[i] - mean) * rstd (+ mean unless shift_mean) : 0, with mean / var merged
// from P partial (count, mean, M2) rows of stats (double); rstd = 0 with fewer than 2 valid elements.
// out (fp32) may alias x.
void whiten_apply(uintptr_t x_ptr, int x_dtype, uintptr_t mask_ptr, int mask_dtype, uintptr_t out_ptr,
                  uintptr_t stats_ptr, int64_t N, int64_t P, double eps, bool shift_mean, int nthreads) {
  const double* st = reinterpret_cast<const double*>(stats_ptr);
  double n = 0.0, total = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    n += st[3 * p];
    total += st[3 * p] * st[3 * p + 1];
  }
  const double mean = n > 0.0 ? total / n : 0.0;
  double m2 = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    const double dm = st[3 * p + 1] - mean;
    m2 += st[3 * p + 2] + st[3 * p] * dm * dm;
  }
  const float rstd = n >= 2.0 ? static_cast<float>(1.0 / std::sqrt(m2 / (n - 1.0) + eps)) : 0.0f;
  const float mu = static_cast<float>(mean), add = shift_mean ? 0.0f : mu;
  float* out = reinterpret_cast<float*>(out_ptr);
  dispatch_float(x_dtype, [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    dispatch_any(mask_dtype, [&](auto* mt) {
      using M = std::remove_pointer_t<decltype(mt)>;
      const X* x = reinterpret_cast<const X*>(x_ptr);
      const M* m = reinterpret_cast<const M*>(mask_ptr);
#pragma omp parallel for simd num_threads(num_threads(nthreads)) if (N >= kParallelMin)
      for (int64_t i = 0; i < N; ++i) {
        const float y = (load_f32(x, i) - mu) * rstd + add;
        out[i] = load_val(m, i) != 0.0f ? y : 0.0f;
      }
    });
  });
}

// scores (B,) as B / G groups; factor = 1 (mean baseline) or G / (G - 1) (leave one out);
// scale: 0 group std, 1 batch std, 2 none (stds unbiased, + eps).
void group_advantages(uintptr_t scores_ptr, int dtype, uintptr_t out_ptr, int64_t B, int64_t G, double factor,
                      double eps, int scale) {
  float* out = reinterpret_cast<float*>(out_ptr);
  double batch_div = 1.0;
  if (scale == 1) {
    double sum = 0.0, m2 = 0.0;
    for (int64_t i = 0; i < B; ++i) sum += load_any(scores_ptr, dtype, i);
    const double mu = sum / static_cast<double>(B);
    for (int64_t i = 0; i < B; ++i) {
      const double dv = load_any(scores_ptr, dtype, i) - mu;
      m2 += dv * dv;
    }
    batch_div = std::sqrt(m2 / static_cast<double>(B - 1)) + eps;
  }
  for (int64_t g0 = 0; g0 < B; g0 += G) {
    double sum = 0.0, m2 = 0.0;
    for (int64_t i = g0; i < g0 + G; ++i) sum += load_any(scores_ptr, dtype, i);
    const double mu = sum / static_cast<double>(G);
    for (int64_t i = g0; i < g0 + G; ++i) {
      const double dv = load_any(scores_ptr, dtype, i) - mu;
      m2 += dv * dv;
    }
    const double div = scale == 0 ? std::sqrt(m2 / static_cast<double>(G - 1)) + eps : batch_div;
    for (int64_t i = g0; i < g0 + G; ++i)
      out[i] = static_cast<float>((load_any(scores_ptr, dtype, i) - mu) * factor / div);
  }
}

void register_advantages(py::module_& m) {
  m.def("advantages_fwd", &advantages_fwd, py::call_guard<py::gil_scoped_release>(),
        "per row: KL-shaped rewards -> GAE -> (count, mean, M2) of the advantages");
  m.def("whiten_stats", &whiten_stats, py::call_guard<py::gil_scoped_release>(),
        "per chunk of 16384 elements: (count, mean, M2) of the masked ones, to a (P, 3) double buffer");
  m.def("whiten_apply", &whiten_apply, py::call_guard<py::gil_scoped_release>(),
        "masked whitening from partial (count, mean, M2) statistics");
  m.def("group_advantages", &group_advantages, py::call_guard<py::gil_scoped_release>(),
        "group-relative advantages (GRPO / RLOO / Dr. GRPO)");
}
RLHF_FAST_REGISTER(register_advantages);

}  // namespace
}  // namespace rlhf_fast
