// Shared helpers for the C++ CPU kernels of rlhf_fast._C.
//
// Tensors cross the Python boundary as raw addresses (uintptr_t) plus sizes: the
// extension does not link libtorch, so it builds with setuptools + pybind11 alone.
// Each kernel file registers its pybind11 functions with RLHF_FAST_REGISTER, so a
// new op never edits bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlhf_fast {

namespace py = pybind11;

// ---- registration -----------------------------------------------------------
using RegisterFn = void (*)(py::module_&);
std::vector<RegisterFn>& registry();
struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(fn); }
};
#define RLHF_FAST_REGISTER(fn) static ::rlhf_fast::Registrar rlhf_fast_registrar_##fn(fn)

// ---- dtypes -----------------------------------------------------------------
// Codes shared with rlhf_fast/_backend.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kBool = 5, kUInt8 = 6 };

inline float bf16_to_f32(uint16_t h) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16);
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// fp16 <-> fp32 without branches (selects only), so loops converting them vectorize; exact
// (round to nearest even on the way down, NaN stays a quiet NaN, overflow gives inf).
inline float f16_to_f32(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa, fp32 positions
  const uint32_t e = em & 0x0f800000u;
  uint32_t o = em + (112u << 23);                            // rebias 15 -> 127
  o = e == 0x0f800000u ? o + (112u << 23) : o;               // inf / NaN: exponent all ones
  const float sub = __builtin_bit_cast(float, em + (113u << 23)) - __builtin_bit_cast(float, 113u << 23);
  o = e == 0u ? __builtin_bit_cast(uint32_t, sub) : o;       // zero / subnormal: man * 2^-24, exactly
  return __builtin_bit_cast(float, o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  // normal half: rebias, round to nearest even on the 13 dropped bits (a carry into inf is right)
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = (15 - 127) << 23
  // subnormal half (|f| < 2^-14): adding 0.5f aligns the mantissa so the FPU rounds it to nearest even
  const float aligned = __builtin_bit_cast(float, a) + 0.5f;
  const uint32_t subn = __builtin_bit_cast(uint32_t, aligned) - 0x3f000000u;
  uint32_t o = a < 0x38800000u ? subn : normal;
  o = a >= 0x47800000u ? 0x7c00u : o;  // >= 2^16: inf (65520 <= |f| < 2^16 rounds up to inf above)
  o = a > 0x7f800000u ? 0x7e00u : o;   // NaN
  return static_cast<uint16_t>(sign | o);
}

template <typename T> inline float load_f32(const T* p, int64_t i);
template <> inline float load_f32<float>(const float* p, int64_t i) { return p[i]; }

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
template <> inline float load_f32<half_t>(const half_t* p, int64_t i) { return f16_to_f32(p[i].bits); }
template <> inline float load_f32<bf16_t>(const bf16_t* p, int64_t i) { return bf16_to_f32(p[i].bits); }

inline void store_f32(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f32(half_t* p, int64_t i, float v) { p[i].bits = f32_to_f16(v); }
inline void store_f32(bf16_t* p, int64_t i, float v) { p[i].bits = f32_to_bf16(v); }

// Calls fn.template operator()<T>() with T the C++ type of a floating dtype code.
template <typename Fn>
inline void dispatch_float(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat16: fn(static_cast<half_t*>(nullptr)); break;
    case kBFloat16: fn(static_cast<bf16_t*>(nullptr)); break;
    default: throw std::invalid_argument("rlhf_fast._C: unsupported floating dtype code " + std::to_string(dtype));
  }
}

inline int64_t load_index(uintptr_t ptr, int dtype, int64_t i) {
  if (dtype == kInt64) return reinterpret_cast<const int64_t*>(ptr)[i];
  if (dtype == kInt32) return reinterpret_cast<const int32_t*>(ptr)[i];
  throw std::invalid_argument("rlhf_fast._C: index dtype must be int32 or int64");
}

// ---- math -------------------------------------------------------------------
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) in float for x <= kExpHi, branch-free so loops using it vectorize (no libm call). The
// softmax kernels call it on z - max <= 0, so it has no overflow path: one clamp keeps 2^n finite
// (callers with larger x use exp_wide, below). x = n ln 2 + r (Cody-Waite, |r| <= ln 2 / 2),
// n rounded by the 1.5 * 2^23 trick with the exponent bias folded in, so 2^n is t's low bits
// shifted into the exponent field; e^r is a degree-6 minimax polynomial (relative error 9e-8
// before rounding). Below kExpLo (n < -126: 2^n would wrap) the last select gives 0, so exp(-inf)
// = 0 exactly. Relative error <= 1 ulp where exp(x) >= 2^-126 (0.91 measured: tests/ops/test_cpu_exp.py
// sweeps the float range against float64), 0 where exp(x) is subnormal (absolute error < 2^-126);
// exp(+-0) = exp(subnormal) = 1; NaN for NaN. About 17 vector instructions: 9 FMAs, a shift, a
// multiply, two compares and their masked selects.
constexpr float kExpLo = -87.3365447f;  // ln 2^-126
constexpr float kExpHi = 88.3762626f;   // 127.5 ln 2: the largest x with n <= 127

// e^r of x = n ln 2 + r; returns p = e^r and sets t, whose low bits hold n + 127 (2^n = t << 23).
inline float exp_reduce(float xc, float& t) {
  t = xc * 1.44269504088896341f + 12583039.0f;  // 1.5 * 2^23 + 127: round(x / ln 2) + 127
  const float n = t - 12583039.0f;
  float r = xc - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (+ 1.7e-12)
  r = r - n * -2.12194440e-4f;
  float p = 1.36874686e-3f;  // minimax on [-0.3468, 0.3468] for relative error, p(0) = 1
  p = p * r + 8.37741792e-3f;
  p = p * r + 4.16722894e-2f;
  p = p * r + 1.66664183e-1f;
  p = p * r + 4.99999672e-1f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// The polynomial of fast_exp for xc <= kExpHi (or NaN), with no select at the low end.
inline float exp_poly(float xc) {
  float t;
  const float p = exp_reduce(xc, t);
  return p * __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, t) << 23);  // p * 2^n
}

// exp(x) for any x in one polynomial: above kExpHi (n = 128) 2^n is formed as 2 * 2^(n - 1) (exact), so
// it fits the exponent field up to ln FLT_MAX; +inf beyond, 0 below kExpLo, fast_exp's accuracy throughout.
constexpr float kLnFltMax = 88.7228394f;
inline float exp_wide(float x) {
  const float xc = x > kLnFltMax ? kLnFltMax : x;  // lets NaN through
  float t;
  const float p = exp_reduce(xc, t);
  const bool big = x > kExpHi;
  const uint32_t bits = (__builtin_bit_cast(uint32_t, t) << 23) - (big ? (1u << 23) : 0u);
  const float e = (p * __builtin_bit_cast(float, bits)) * (big ? 2.0f : 1.0f);
  const float lo = x < kExpLo ? 0.0f : e;
  return x > kLnFltMax ? std::numeric_limits<float>::infinity() : lo;
}

inline float fast_exp(float x) {
  const float xc = x > kExpHi ? kExpHi : x;  // lets NaN through (the comparison is false)
  return x < kExpLo ? 0.0f : exp_poly(xc);
}

// exp(x) of the log-prob kernel's sums, for x = z - max already clamped to [kExpLo, 0] (or NaN): fast_exp
// without its two selects. Below kExpLo each term is exp(kExpLo) = 2^-126 instead of 0 (the caller
// clamps x, so -inf logits give finite terms and the entropy's e * x has no 0 * inf): a row's sum is at
// least 1 (its max term), so V such terms are far below one ulp of it.
inline float exp_clamped(float xc) { return exp_poly(xc); }

// tanh(u) in float, branch-free (selects only) so loops using it vectorize: the odd Taylor
// polynomial to u^15 for |u| < 0.4 (truncation < 1e-9 relative), else (1 - e) / (1 + e) with
// e = fast_exp(-2|u|), where 1 - e no longer cancels; the sign is copied back. Max relative error
// 2.1 ulp measured (near |u| = 0.54) (tests/ops/test_logit_transforms.py measures it); +-1 for |u| > 9.1
// and +-inf, NaN for NaN.
inline float fast_tanh(float u) {
  const float a = std::fabs(u);
  const float e = fast_exp(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float as = a < 0.4f ? a : 0.4f;  // the polynomial's own range: no inf - inf where it is not selected
  const float u2 = as * as;
  float p = -1.45583438705131827e-3f;  // -929569 / 638512875
  p = p * u2 + 3.59212803657248102e-3f;  // 21844 / 6081075
  p = p * u2 - 8.86323552990219656e-3f;  // -1382 / 155925
  p = p * u2 + 2.18694885361552028e-2f;  // 62 / 2835
  p = p * u2 - 5.39682539682539683e-2f;  // -17 / 315
  p = p * u2 + 1.33333333333333333e-1f;  // 2 / 15
  p = p * u2 - 3.33333333333333333e-1f;  // -1 / 3
  const float small = as + as * u2 * p;
  return std::copysign(a < 0.4f ? small : big, u);
}

// The logit transform every vocabulary kernel applies on load (see rlhf_fast/ops/logprobs.py
// logit_coefs): z = x * mul without softcap, z = tanh(x * cap_pre) * mul with it, where
// mul = softcap / T and cap_pre = logit_scale / softcap; dz/dx = mul * cap_pre * (1 - tanh^2).
template <bool kCap>
inline float logit_z(float x, float mul, float cap_pre) {
  if constexpr (kCap) return fast_tanh(x * cap_pre) * mul;
  return x * mul;
}

inline float logit_z_any(float x, float mul, float cap_pre) {  // scalar use: cap_pre == 0 means no softcap
  return cap_pre != 0.0f ? logit_z<true>(x, mul, cap_pre) : logit_z<false>(x, mul, cap_pre);
}

// Hot row functions: one clone per x86-64 level (v3 = AVX2 + FMA + F16C, v4 = AVX-512), picked
// at load time. tests/ops/test_cpu_vectorization.py checks that their loops stay vectorised.
#define RLHF_FAST_HOT_FN \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten, noinline))

// Online softmax statistics of one row of z = logit_z<kCap>(logits), in one pass:
// m = max z, s = sum exp(z - m), a = sum exp(z - m) * (z - m) (for the entropy).
// A row holding NaN or +inf gives s = NaN; a row of only -inf gives m = -inf: lse = -inf, logp and H NaN.
struct RowStats {
  float m = kNegInf, s = 0.0f, a = 0.0f;
  float lse() const { return m + std::log(s); }
  float entropy() const {  // H = log s - a / s, clamped at 0 from below (NaN stays NaN); NaN for m = +-inf
    float h = std::log(s) - a / s + (m - m);
    return h < 0.0f ? 0.0f : h;
  }
};

constexpr int64_t kChunk = 1024;

// v itself, hidden from the optimiser (an empty asm that may have changed it), so loops see a variable
inline float opaque_f32(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#endif
  return v;
}

// F16C chunk conversions (f16c.cpp): whether this CPU has them, fp16 -> fp32 and fp32 -> fp16 (round to
// nearest even) of n values. Out of line, so the clones of the hot row functions can call them.
bool cpu_has_f16c();
void widen_f16(const half_t* x, float* out, int64_t n);
void narrow_f16(const float* in, half_t* out, int64_t n);

// buf[0..n) = z = logit_z<kCap>(x[0..n)); returns max(cmax, max z) (NaN never wins the max).
// fp16 with F16C: widened by widen_f16 first, then transformed in place.
template <typename T, bool kCap>
inline float load_chunk(const T* x, int64_t n, float inv_temp, float cap_pre, float* buf, float cmax) {
  if constexpr (std::is_same_v<T, half_t>) {
    if (cpu_has_f16c()) {
      widen_f16(x, buf, n);
      return load_chunk<float, kCap>(buf, n, inv_temp, cap_pre, buf, cmax);
    }
  }
#pragma omp simd reduction(max : cmax)
  for (int64_t j = 0; j < n; ++j) {
    const float z = logit_z<kCap>(load_f32(x, j), inv_temp, cap_pre);
    buf[j] = z;
    cmax = z > cmax ? z : cmax;
  }
  return cmax;
}

// Streams one row (x[0..V)) chunk by chunk into stats, software-pipelined: chunk k + 1 is read
// from memory (converted and scaled into one of two L1 buffers, its max taken) in the same loop
// that sums exp(z - m) over chunk k from the other buffer, so the memory stream overlaps the exp
// work instead of alternating with it. The loops are `omp simd` reductions, which gcc vectorises
// without -ffast-math; the entropy adds one multiply-add per element.
//
// The clamp of z - m at kExpLo goes through a value the compiler cannot see (opaque_f32): with the
// constant, gcc folds the clamp into the exp (exp_poly of the unclamped d, then a select of the constant
// exp(kExpLo) for the clamped lanes), which is free for the sum alone but costs the entropy's e * d a
// second multiply and a blend (1.16x the entropy-off row instead of 1.06x, measured on Zen 4).
template <typename T, bool kEntropy, bool kCap = false>
inline RowStats row_stats(const T* x, int64_t V, float inv_temp, float cap_pre = 0.0f) {
  const float lo = opaque_f32(kExpLo);
  RowStats st;
  alignas(64) float buf[2][kChunk];
  int64_t n = V < kChunk ? V : kChunk;
  float cmax = load_chunk<T, kCap>(x, n, inv_temp, cap_pre, buf[0], kNegInf);
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kChunk, ++k) {
    const int64_t c1 = c0 + kChunk, nn = c1 >= V ? 0 : (V - c1 < kChunk ? V - c1 : kChunk);
    const float m_new = cmax > st.m ? cmax : st.m;
    if (m_new > st.m) {  // re-measure the sums so far from the new max
      if (st.m == kNegInf) {
        st.s = st.a = 0.0f;  // the 2^-126 terms of an all -inf prefix (exp_clamped)
      } else if (st.s > 0.0f) {
        const float alpha = std::exp(st.m - m_new);
        if (kEntropy) st.a = alpha * (st.a + (st.m - m_new) * st.s);
        st.s *= alpha;
      }
    }
    st.m = m_new;
    const float m = m_new == kNegInf ? 0.0f : m_new;  // all -inf so far: no NaN from -inf - -inf
    const float* cur = buf[k & 1];
    float* nxt = buf[(k + 1) & 1];
    const T* xn = x + (nn ? c1 : 0);
    float s = 0.0f, a = 0.0f, nmax = kNegInf;
    // 16-bit input: the next chunk is widened in its own loop (load_chunk; F16C for fp16 where the CPU has
    // it) before the exp loop. Fused into the exp loop, gcc vectorised the widening at half width with
    // extra shuffles, and the bf16 row ran 1.2-1.3x the fp32 one, where it now runs 1.05-1.15x.
    int64_t done = 0;  // how much of chunk k the fused loop summed
    if constexpr (!std::is_same_v<T, float>) {
      nmax = nn ? load_chunk<T, kCap>(xn, nn, inv_temp, cap_pre, nxt, kNegInf) : kNegInf;
    } else {
#pragma omp simd reduction(+ : s, a) reduction(max : nmax)
      for (int64_t j = 0; j < nn; ++j) {
        const float d0 = cur[j] - m, d = d0 < lo ? lo : d0;  // lets NaN through
        const float e = exp_clamped(d);
        s += e;
        if constexpr (kEntropy) a += e * d;
        const float z = logit_z<kCap>(load_f32(xn, j), inv_temp, cap_pre);
        nxt[j] = z;
        nmax = z > nmax ? z : nmax;
      }
      done = nn;
    }
#pragma omp simd reduction(+ : s, a)
    for (int64_t j = done; j < n; ++j) {  // the rest of chunk k: all of it, or what chunk k + 1 did not cover
      const float d0 = cur[j] - m, d = d0 < lo ? lo : d0;
      const float e = exp_clamped(d);
      s += e;
      if constexpr (kEntropy) a += e * d;
    }
    st.s += s;
    st.a += a;
    cmax = nmax;
    n = nn;
  }
  return st;
}

// Address of row r of a (n_rows, V) view whose rows are laid out as
// (r / inner) * s_outer + (r % inner) * s_inner elements from the base.
struct RowLayout {
  int64_t inner, s_outer, s_inner;
  int64_t offset(int64_t r) const { return (r / inner) * s_outer + (r % inner) * s_inner; }
};

// Rows per OpenMP task of the row kernels: dynamic scheduling, so that on a loaded machine a thread
// that is descheduled for a while leaves its rows to the others instead of stalling the barrier.
constexpr int kRowsPerTask = 4;

inline int num_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace rlhf_fast
