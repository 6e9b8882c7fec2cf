// Per-token KL estimators of rlhf_fast (d = logp - ref_logp), codes shared with
// rlhf_fast/ops/_triton_common.py KL_ESTIMATORS: 0 k1 = d, 1 abs = |d|, 2 k2 = d^2 / 2,
// 3 k3 = exp(-d) + d - 1. Used by kl.cpp and advantages.cpp.
#pragma once

#include <cmath>

namespace rlhf_fast {

inline float kl_est_value(float d, int est) {
  switch (est) {
    case 0: return d;
    case 1: return std::fabs(d);
    case 2: return 0.5f * d * d;
    default: return std::expm1(-d) + d;
  }
}

inline float kl_est_grad(float d, int est) {  // d(kl_est_value)/dd
  switch (est) {
    case 0: return 1.0f;
    case 1: return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
    case 2: return d;
    default: return -std::expm1(-d);
  }
}

}  // namespace rlhf_fast
