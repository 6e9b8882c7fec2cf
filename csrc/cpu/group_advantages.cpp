// Group-relative advantages on CPU (semantics: rlhf_fast/ops/group_advantages.py group_advantages_ref).
// Statistics in double, two passes (mean, then squared deviations).
#include "common.h"
#include "scalar_loads.h"

#include <vector>

namespace rlhf_fast {
namespace {

// Batch mean and unbiased std over all B scores, in double: per-chunk partial sums over a fixed chunk
// layout, added in order, so the result does not depend on the thread count.
template <typename T>
double batch_std(const T* x, int64_t B, int nthreads) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t n_chunks = (B + kChunk - 1) / kChunk;
  std::vector<double> part(n_chunks);
  auto chunked = [&](auto&& body) {
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (B >= kParallelMin)
    for (int64_t c = 0; c < n_chunks; ++c) {
      double acc = 0.0;
      for (int64_t i = c * kChunk; i < std::min(B, (c + 1) * kChunk); ++i) acc += body(static_cast<double>(load_val(x, i)));
      part[c] = acc;
    }
    double total = 0.0;
    for (double v : part) total += v;
    return total;
  };
  const double mu = chunked([](double v) { return v; }) / static_cast<double>(B);
  const double m2 = chunked([mu](double v) { return (v - mu) * (v - mu); });
  return std::sqrt(m2 / static_cast<double>(B - 1));
}

// scale: 0 group std, 1 batch std, 2 none (stds unbiased, + eps). Statistics in double, two passes.
void group_advantages(uintptr_t scores_ptr, int dtype, uintptr_t out_ptr, int64_t B, int64_t G, double factor,
                      double eps, int scale, int nthreads) {
  float* out = reinterpret_cast<float*>(out_ptr);
  check_code(scores_ptr, dtype);
  dispatch_any(dtype, [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    const T* x = reinterpret_cast<const T*>(scores_ptr);
    const double batch_div = scale == 1 ? batch_std(x, B, nthreads) + eps : 1.0;
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (B >= kParallelMin)
    for (int64_t g0 = 0; g0 < B; g0 += G) {
      double sum = 0.0, m2 = 0.0;
      for (int64_t i = g0; i < g0 + G; ++i) sum += load_val(x, i);
      const double mu = sum / static_cast<double>(G);
      for (int64_t i = g0; i < g0 + G; ++i) {
        const double dv = load_val(x, i) - mu;
        m2 += dv * dv;
      }
      const double div = scale == 0 ? std::sqrt(m2 / static_cast<double>(G - 1)) + eps : batch_div;
      const double mul = factor / div;  // one division per group
      for (int64_t i = g0; i < g0 + G; ++i) out[i] = static_cast<float>((load_val(x, i) - mu) * mul);
    }
  });
}

void register_group_advantages(py::module_& m) {
  m.def("group_advantages", &group_advantages, py::call_guard<py::gil_scoped_release>(),
        "group-relative advantages (GRPO / RLOO / Dr. GRPO)");
}
RLHF_FAST_REGISTER(register_group_advantages);

}  // namespace
}  // namespace rlhf_fast
