// Per-token KL estimators of rlhf_fast (d = logp - ref_logp), codes shared with
// rlhf_fast/ops/_triton_common.py KL_ESTIMATORS: 0 k1 = d, 1 abs = |d|, 2 k2 = d^2 / 2,
// 3 k3 = exp(-d) + d - 1. Used by kl.cpp and advantages.cpp.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"

namespace rlhf_fast {

// k3 = expm1(-d) + d without a libm call, so loops over it vectorize: a Taylor series for |d| < 1/2
// (terms to d^10: relative error < 1e-9), exp(-d) + d - 1 beyond (absolute error ~1 ulp of exp(-d)).
inline float kl_k3(float d) {
  float p = 1.0f / 3628800.0f;  // (-d)^n / n!, n = 2..10, Horner in d
  p = p * d - 1.0f / 362880.0f;
  p = p * d + 1.0f / 40320.0f;
  p = p * d - 1.0f / 5040.0f;
  p = p * d + 1.0f / 720.0f;
  p = p * d - 1.0f / 120.0f;
  p = p * d + 1.0f / 24.0f;
  p = p * d - 1.0f / 6.0f;
  p = p * d + 0.5f;
  const float small = p * d * d;
  const float big = (exp_wide(-d) - 1.0f) + d;
  return std::fabs(d) < 0.5f ? small : big;
}

inline float kl_est_value(float d, int est) {
  switch (est) {
    case 0: return d;
    case 1: return std::fabs(d);
    case 2: return 0.5f * d * d;
    default: return kl_k3(d);
  }
}

inline float kl_est_grad(float d, int est) {  // d(kl_est_value)/dd
  switch (est) {
    case 0: return 1.0f;
    case 1: return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
    case 2: return d;
    default: return 1.0f - exp_wide(-d);  // -expm1(-d), as torch's autograd of the reference computes it
  }
}

}  // namespace rlhf_fast
