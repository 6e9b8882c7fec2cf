// Masked whitening on CPU (semantics: rlhf_fast/ops/whiten.py masked_whiten_ref):
// partial (count, mean, M2) per chunk, merged in double, then normalise.
#include "common.h"
#include "scalar_loads.h"

namespace rlhf_fast {
namespace {

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
// from P partial (count, mean, M2) rows of stats (double); rstd = 0 with fewer than 2 valid elements
// or a zero variance with eps = 0 (constant input: the output is 0, not 0 * inf).
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
  const double var_eps = m2 / (n - 1.0) + eps;
  const double rstd = n >= 2.0 && var_eps != 0.0 ? 1.0 / std::sqrt(var_eps) : 0.0;
  const double add = shift_mean ? 0.0 : mean;
  float* out = reinterpret_cast<float*>(out_ptr);
  dispatch_float(x_dtype, [&](auto* xt) {
    using X = std::remove_pointer_t<decltype(xt)>;
    dispatch_any(mask_dtype, [&](auto* mt) {
      using M = std::remove_pointer_t<decltype(mt)>;
      const X* x = reinterpret_cast<const X*>(x_ptr);
      const M* m = reinterpret_cast<const M*>(mask_ptr);
#pragma omp parallel for simd num_threads(num_threads(nthreads)) if (N >= kParallelMin)
      for (int64_t i = 0; i < N; ++i) {
        // in double: a float mean would round away a small spread over a large offset
        const double y = (static_cast<double>(load_f32(x, i)) - mean) * rstd + add;
        out[i] = load_val(m, i) != 0.0f ? static_cast<float>(y) : 0.0f;
      }
    });
  });
}

void register_whiten(py::module_& m) {
  m.def("whiten_stats", &whiten_stats, py::call_guard<py::gil_scoped_release>(),
        "per chunk of 16384 elements: (count, mean, M2) of the masked ones, to a (P, 3) double buffer");
  m.def("whiten_apply", &whiten_apply, py::call_guard<py::gil_scoped_release>(),
        "masked whitening from partial (count, mean, M2) statistics");
}
RLHF_FAST_REGISTER(register_whiten);

}  // namespace
}  // namespace rlhf_fast
