// Group-relative advantages on CPU (semantics: rlhf_fast/ops/group_advantages.py group_advantages_ref).
// Statistics in double, two passes (mean, then squared deviations).
#include "common.h"
#include "scalar_loads.h"

namespace rlhf_fast {
namespace {

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

void register_group_advantages(py::module_& m) {
  m.def("group_advantages", &group_advantages, py::call_guard<py::gil_scoped_release>(),
        "group-relative advantages (GRPO / RLOO / Dr. GRPO)");
}
RLHF_FAST_REGISTER(register_group_advantages);

}  // namespace
}  // namespace rlhf_fast
