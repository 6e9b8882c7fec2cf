// fp16 <-> fp32 of whole chunks with F16C (vcvtph2ps / vcvtps2ph), for the fp16 rows of the vocabulary
// kernels on CPUs that have it (every x86-64-v3 CPU). The portable bit conversions of common.h
// (f16_to_f32 / f32_to_f16) vectorise, but cost the fp16 rows 1.3-1.8x the fp32 time; gcc 12 does not
// vectorise _Float16 conversions without AVX512-FP16. Exact both ways: widening is exact, narrowing
// rounds to nearest even (as f32_to_f16), overflow gives inf, NaN stays NaN.
#include <immintrin.h>

#include "common.h"

namespace rlhf_fast {

namespace {
bool supported() { return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2"); }
bool& enabled() {
  static bool on = supported();
  return on;
}

// For the tests: turns the F16C path off (the portable conversions run instead) or back on where the
// CPU has it; returns the previous setting. Not for use while kernels run.
bool use_f16c(bool on) {
  const bool prev = enabled();
  enabled() = on && supported();
  return prev;
}

void register_f16c(py::module_& m) {
  m.def("use_f16c", &use_f16c, "turn the F16C fp16 conversions on (where the CPU has them) or off; returns "
        "the previous setting (for tests)");
}
}  // namespace
RLHF_FAST_REGISTER(register_f16c);

bool cpu_has_f16c() { return enabled(); }

__attribute__((target("avx2,f16c"))) void widen_f16(const half_t* x, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
  for (; j < n; ++j) out[j] = f16_to_f32(x[j].bits);
}

__attribute__((target("avx2,f16c"))) void narrow_f16(const float* in, half_t* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; j < n; ++j) out[j].bits = f32_to_f16(in[j]);
}

}  // namespace rlhf_fast
