// GAE and KL-shaped rewards on CPU (semantics: rlhf_fast/ops/gae.py *_ref).
//   advantages_fwd: per row, backwards in time over the valid positions: KL-shaped rewards,
//                   GAE, and the row's (count, mean, M2) of the advantages for whitening.
// Rows run in parallel (OpenMP); a row's recurrence is one backward loop.
#include "common.h"
#include "kl_estimators.h"
#include "scalar_loads.h"

// VecF below is a GCC vector type; it never crosses a non-inlined call, so the AVX ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rlhf_fast {
namespace {

#define RLHF_FAST_ROW_FN __attribute__((target_clones("avx512f", "avx2", "default"), flatten, noinline))

// ---- advantages_fwd -----------------------------------------------------------
// kRows rows run side by side: a time tile of each is loaded into fp32 arrays laid out [t][row]
// (any input dtype), so the backward recurrence advances kRows independent rows per step as one
// SIMD vector instead of waiting on one row's dependency chain.
constexpr int kRows = 8;
constexpr int64_t kTile = 1024;  // 4 tile arrays of kTile * kRows floats: 128 KB of stack
typedef float VecF __attribute__((vector_size(kRows * sizeof(float))));  // one step of kRows rows
typedef int32_t VecI __attribute__((vector_size(kRows * sizeof(int32_t))));
typedef double VecD __attribute__((vector_size(kRows * sizeof(double))));  // the whitening statistics

inline VecF splat(float x) { return VecF{} + x; }
inline VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

struct AdvArgs {
  uintptr_t scores, lp, ref, rew, val, mask;
  int scores_dt, lp_dt, ref_dt, rew_dt, val_dt, mask_dt;
  int64_t lp_s, ref_s, rew_s, val_s, mask_s;
  int64_t B, T;
  float coef, g, gl;
  int est;
  float *rew_out, *adv, *ret;
  double* stats;
};

// dst[i * kRows + k] = src[off + i] as float, for i < len
inline void load_column(uintptr_t base, int dtype, int64_t off, int64_t len, float* dst, int k) {
  dispatch_any(dtype, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    const X* p = reinterpret_cast<const X*>(base) + off;
    for (int64_t i = 0; i < len; ++i) dst[i * kRows + k] = load_val(p, i);
  });
}

// In-place 8 x 8 transpose of r[0..8) (r[j][k] <- r[k][j]) with three rounds of shuffles.
inline void transpose8(VecF* r) {
  VecF t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], VecI{0, 8, 1, 9, 4, 12, 5, 13});
    t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], VecI{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = __builtin_shuffle(t[4 * i], t[4 * i + 2], VecI{0, 1, 8, 9, 4, 5, 12, 13});
    u[4 * i + 1] = __builtin_shuffle(t[4 * i], t[4 * i + 2], VecI{2, 3, 10, 11, 6, 7, 14, 15});
    u[4 * i + 2] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], VecI{0, 1, 8, 9, 4, 5, 12, 13});
    u[4 * i + 3] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], VecI{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], VecI{0, 1, 2, 3, 8, 9, 10, 11});
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], VecI{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// Loads rows r0..r0+nr of a (B, T) input, positions [lo, lo + len), into dst laid out [t][row]:
// fp32 with a full group by 8 x 8 register transposes, anything else column by column.
inline void load_rows(uintptr_t base, int dtype, int64_t stride, int64_t r0, int nr, int64_t lo, int64_t len,
                      float* dst) {
  if (dtype == kFloat32 && nr == kRows) {
    const float* p = reinterpret_cast<const float*>(base) + r0 * stride + lo;
    int64_t i = 0;
    for (; i + 2 * kRows <= len; i += 2 * kRows) {  // a whole 64-byte line of each row at once: rows
      VecF r[kRows], q[kRows];                      // T apart share cache sets, lines must not be re-read
      for (int k = 0; k < kRows; ++k) {
        r[k] = load_vec(p + k * stride + i);
        q[k] = load_vec(p + k * stride + i + kRows);
      }
      transpose8(r);
      transpose8(q);
      for (int j = 0; j < kRows; ++j) store_vec(dst + (i + j) * kRows, r[j]);
      for (int j = 0; j < kRows; ++j) store_vec(dst + (i + kRows + j) * kRows, q[j]);
    }
    for (; i < len; ++i)
      for (int k = 0; k < kRows; ++k) dst[i * kRows + k] = p[k * stride + i];
    return;
  }
  for (int k = 0; k < nr; ++k) load_column(base, dtype, (r0 + k) * stride + lo, len, dst, k);
}

// The inverse: src [t][row] -> rows r0..r0+nr of a contiguous (B, T) fp32 output.
inline void store_rows(float* out, int64_t T, int64_t r0, int nr, int64_t lo, int64_t len, const float* src) {
  float* p = out + r0 * T + lo;
  int64_t i = 0;
  if (nr == kRows) {
    for (; i + 2 * kRows <= len; i += 2 * kRows) {  // whole 64-byte lines, as in load_rows
      VecF r[kRows], q[kRows];
      for (int j = 0; j < kRows; ++j) {
        r[j] = load_vec(src + (i + j) * kRows);
        q[j] = load_vec(src + (i + kRows + j) * kRows);
      }
      transpose8(r);
      transpose8(q);
      for (int k = 0; k < kRows; ++k) {
        store_vec(p + k * T + i, r[k]);
        store_vec(p + k * T + i + kRows, q[k]);
      }
    }
  }
  for (int k = 0; k < nr; ++k)
    for (int64_t j = i; j < len; ++j) p[k * T + j] = src[j * kRows + k];
}

template <int kEst>
inline void kl_tile(float* d, int64_t n) {  // d = logp - ref_logp -> estimator, in place
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = kl_est_value(d[i], kEst);
}

template <bool kShape, bool kGae>
RLHF_FAST_ROW_FN void advantages_rows(const AdvArgs& A, int64_t r0) {
  const int nr = static_cast<int>(std::min<int64_t>(kRows, A.B - r0));
  alignas(64) float mk[kTile * kRows], rr[kTile * kRows], vv[kTile * kRows], aa[kTile * kRows];
  const VecF zero = splat(0.0f), one = splat(1.0f), coef = splat(A.coef), g = splat(A.g), gl = splat(A.gl);
  VecF na = zero, nv = zero, seen = zero, score = zero;
  double n[kRows] = {}, mean[kRows] = {}, m2[kRows] = {};
  if (kShape)
    for (int k = 0; k < nr; ++k) score[k] = load_any(A.scores, A.scores_dt, r0 + k);
  for (int64_t hi = A.T; hi > 0; hi -= kTile) {
    const int64_t lo = hi > kTile ? hi - kTile : 0, len = hi - lo;
    for (int k = nr; k < kRows; ++k)  // padding rows: all masked
      for (int64_t i = 0; i < len; ++i) mk[i * kRows + k] = rr[i * kRows + k] = vv[i * kRows + k] = aa[i * kRows + k] = 0.0f;
    load_rows(A.mask, A.mask_dt, A.mask_s, r0, nr, lo, len, mk);
    if (kShape) {
      load_rows(A.lp, A.lp_dt, A.lp_s, r0, nr, lo, len, rr);
      load_rows(A.ref, A.ref_dt, A.ref_s, r0, nr, lo, len, aa);
    } else {
      load_rows(A.rew, A.rew_dt, A.rew_s, r0, nr, lo, len, rr);
    }
    if (kGae) load_rows(A.val, A.val_dt, A.val_s, r0, nr, lo, len, vv);
    const int64_t n_el = len * kRows;
    if (kShape) {
#pragma omp simd
      for (int64_t i = 0; i < n_el; ++i) rr[i] -= aa[i];
      switch (A.est) {
        case 0: kl_tile<0>(rr, n_el); break;
        case 1: kl_tile<1>(rr, n_el); break;
        case 2: kl_tile<2>(rr, n_el); break;
        default: kl_tile<3>(rr, n_el); break;
      }
    }
    for (int64_t t = len - 1; t >= 0; --t) {  // the state lives in vector registers
      const int64_t o = t * kRows;
      const VecI ok = load_vec(mk + o) != 0.0f;
      VecF rw = load_vec(rr + o);
      if (kShape) {  // -coef * kl, plus the score at the row's last valid position
        rw = ok ? -coef * rw + (seen == 0.0f ? score : zero) : zero;
        seen = ok ? one : seen;
        store_vec(rr + o, rw);
      }
      if (kGae) {
        const VecF v = load_vec(vv + o);
        const VecF x = gl * na + (rw - v + g * nv);
        na = ok ? x : na;
        nv = ok ? v : nv;
        store_vec(aa + o, ok ? x : zero);
        store_vec(vv + o, ok ? x + v : zero);  // returns
      }
    }
    if (kShape) store_rows(A.rew_out, A.T, r0, nr, lo, len, rr);
    if (kGae) {
      store_rows(A.adv, A.T, r0, nr, lo, len, aa);
      store_rows(A.ret, A.T, r0, nr, lo, len, vv);
    }
    if (kGae && A.stats) {  // the tile's (count, mean, M2) per row, all rows at once, in double:
      // (adv - mean)^2 of fp32 advantages ~1e20 would overflow a float
      const VecD zd = VecD{} + 0.0, oned = VecD{} + 1.0;
      VecD cnt = zd, sum = zd, tm2 = zd;
      for (int64_t i = 0; i < len; ++i) {
        cnt += __builtin_convertvector(load_vec(mk + i * kRows) != 0.0f ? one : zero, VecD);
        sum += __builtin_convertvector(load_vec(aa + i * kRows), VecD);  // 0 where masked
      }
      const VecD tm = sum / (cnt > 0.0 ? cnt : oned);
      for (int64_t i = 0; i < len; ++i) {
        const VecD dv = __builtin_convertvector(load_vec(aa + i * kRows), VecD) - tm;
        const VecD okd = __builtin_convertvector(load_vec(mk + i * kRows) != 0.0f ? one : zero, VecD);
        tm2 += okd * (dv * dv);
      }
      for (int k = 0; k < nr; ++k) {  // Chan et al.
        if (cnt[k] == 0.0) continue;
        const double c = cnt[k], tot = n[k] + c, delta = tm[k] - mean[k];
        mean[k] += delta * c / tot;
        m2[k] += tm2[k] + delta * delta * n[k] * c / tot;
        n[k] = tot;
      }
    }
  }
  if (kGae && A.stats)
    for (int k = 0; k < nr; ++k) {
      A.stats[3 * (r0 + k)] = n[k];
      A.stats[3 * (r0 + k) + 1] = mean[k];
      A.stats[3 * (r0 + k) + 2] = m2[k];
    }
}

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
  for (auto [p, c] : {std::pair{scores_ptr, scores_dtype}, {lp_ptr, lp_dtype}, {ref_ptr, ref_dtype},
                      {rew_ptr, rew_dtype}, {val_ptr, val_dtype}, {mask_ptr, mask_dtype}})
    check_code(p, c);
  const AdvArgs A{scores_ptr, lp_ptr, ref_ptr, rew_ptr, val_ptr, mask_ptr,
                  scores_dtype, lp_dtype, ref_dtype, rew_dtype, val_dtype, mask_dtype,
                  lp_stride, ref_stride, rew_stride, val_stride, mask_stride, B, T,
                  static_cast<float>(kl_coef), static_cast<float>(gamma), static_cast<float>(gamma * lam), est,
                  reinterpret_cast<float*>(rew_out_ptr), reinterpret_cast<float*>(adv_ptr),
                  reinterpret_cast<float*>(ret_ptr), reinterpret_cast<double*>(stats_ptr)};
  const bool shape = scores_ptr != 0, with_gae = val_ptr != 0;
  const int64_t groups = (B + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(num_threads(nthreads)) if (B * T >= kParallelMin)
  for (int64_t gi = 0; gi < groups; ++gi) {
    if (shape && with_gae) advantages_rows<true, true>(A, gi * kRows);
    else if (shape) advantages_rows<true, false>(A, gi * kRows);
    else advantages_rows<false, true>(A, gi * kRows);
  }
}


void register_gae(py::module_& m) {
  m.def("advantages_fwd", &advantages_fwd, py::call_guard<py::gil_scoped_release>(),
        "per row: KL-shaped rewards -> GAE -> (count, mean, M2) of the advantages");
}
RLHF_FAST_REGISTER(register_gae);

}  // namespace
}  // namespace rlhf_fast
