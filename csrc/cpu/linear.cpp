// fp32 GEMM for the LM head of the from-hidden ops (rlhf_fast/ops/head_gemm.py):
//   C (M x N, row stride ldc) = beta * C + A @ B (+ bias[j] when given),
//   A(i, k) = a[i * rsa + k * csa],  B(k, j) = b[k * rsb + j * csb]  (any strides: the packing reads them).
// Why our own: the three head GEMMs need an output buffer we own (the reused logits tile) and
// accumulation in place (grad_weight += g^T h over token chunks); torch.mm gives both, but on this
// project's CPUs (AMD Zen, AVX-512) its MKL runs an AVX2 path at about half the machine's FMA peak,
// and oneDNN (2x faster) is reachable only through ops that allocate a fresh output per call.
// BLIS-style: B packed in KC x NR panels (NR = 32), A in MR x KC panels (MR = 8), an 8 x 32
// AVX-512 micro-kernel (16 accumulators); threads take independent pieces of C (see gemm_impl), or of K
// when K is long and C small (gemm_split_k).
// Built for AVX-512 only (target attribute); gemm_available() tells Python whether this CPU has it.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <memory>

#include "common.h"

namespace rlhf_fast {
namespace {

// NC_COLMAJOR: the column block for column-major B (the LM head's forward, B = W.T): each of its columns
// is a row of W, read kc floats at a time, so one block touches nc pages per KC slice; 4096 of them
// overflow the TLB (the block's pack ran at half the speed of a row-major B's), 512 stay in it.
constexpr int64_t MR = 8, NR = 32, KC = 256, MC = 256, NC = 4096, NC_COLMAJOR = 512;
static_assert(MC % MR == 0 && NC % NR == 0 && NC_COLMAJOR % NR == 0 && NC_COLMAJOR <= NC,
              "the pack buffers hold MC x KC and KC x NC floats");

#define RLHF_FAST_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))

// One stage of the 16 x 16 transpose: swaps the off-diagonal B x B blocks of every 2B x 2B block with
// two-source permutes. lo: row i (bit B clear) keeps its columns without bit B and takes row i + B's
// from c - B; hi: row i + B takes row i's from c + B and keeps its own.
template <int B>
struct TransposeStage {
  static constexpr std::array<int, 16> index(bool hi) {
    std::array<int, 16> out{};
    for (int c = 0; c < 16; ++c) out[c] = hi ? ((c & B) ? 16 + c : c + B) : ((c & B) ? 16 + c - B : c);
    return out;
  }
  static constexpr std::array<int, 16> kLo = index(false), kHi = index(true);
  RLHF_FAST_AVX512 static inline void run(__m512 r[16]) {
    const __m512i lo = _mm512_loadu_si512(kLo.data()), hi = _mm512_loadu_si512(kHi.data());
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & B) continue;
      const __m512 a = r[i], c = r[i + B];
      r[i] = _mm512_permutex2var_ps(a, lo, c);
      r[i + B] = _mm512_permutex2var_ps(a, hi, c);
    }
  }
};

// The 16 x 16 transpose of r[0..16) (rows) in place, in registers: log2(16) stages (B = 8, 4, 2, 1),
// each fully unrolled with constant permute indices.
RLHF_FAST_AVX512 inline void transpose16(__m512 r[16]) {
  TransposeStage<8>::run(r);
  TransposeStage<4>::run(r);
  TransposeStage<2>::run(r);
  TransposeStage<1>::run(r);
}

// Two MR panels of a row-major A (A(i, k) = row[i * rsa + k]) from its first min(m, 16) rows: 16 k at a
// time, the 16 rows are transposed so that vector k holds A(0..16, k); its low 8 go to the first panel,
// its high 8 to the second (written only when m > MR). Rows at or past m are zero.
RLHF_FAST_AVX512 void pack_a_rows16(const float* row, int64_t rsa, int64_t m, int64_t kc, float* ap) {
  __m512 r[16];
  float* second = ap + MR * kc;
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    const int64_t rem = std::min<int64_t>(16, kc - k0);
    const __mmask16 km = rem == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rem) - 1);
    for (int i = 0; i < 16; ++i) r[i] = i < m ? _mm512_maskz_loadu_ps(km, row + i * rsa + k0) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t kk = 0; kk < rem; ++kk) _mm512_mask_storeu_ps(ap + (k0 + kk) * MR, 0x00FF, r[kk]);
    if (m > MR)  // lanes 8..16 to second[k * MR + 0..8)
      for (int64_t kk = 0; kk < rem; ++kk) _mm512_mask_storeu_ps(second + (k0 + kk) * MR - MR, 0xFF00, r[kk]);
  }
}

// Ap[p][k][r] = A(i0 + p*MR + r, k0 + k), zero past m
RLHF_FAST_AVX512 void pack_a(const float* a, int64_t rsa, int64_t csa, int64_t m, int64_t kc, float* ap) {
  if (csa == 1 && rsa != 1) {  // row-major A (the LM head's hidden, grad_hidden's g): 16 x 16 transposes
    for (int64_t p = 0; p * MR < m; p += 2) pack_a_rows16(a + p * MR * rsa, rsa, m - p * MR, kc, ap + p * MR * kc);
    return;
  }
  for (int64_t p = 0; p * MR < m; ++p) {
    float* dst = ap + p * MR * kc;
    const int64_t rows = std::min<int64_t>(MR, m - p * MR);
    const float* src = a + p * MR * rsa;
    if (rsa == 1 && rows == MR) {  // column-major A: 8 contiguous floats per k
      for (int64_t k = 0; k < kc; ++k) _mm256_storeu_ps(dst + k * MR, _mm256_loadu_ps(src + k * csa));
    } else {
      for (int64_t r = 0; r < MR; ++r)
        for (int64_t k = 0; k < kc; ++k) dst[k * MR + r] = r < rows ? src[r * rsa + k * csa] : 0.0f;
    }
  }
}

// Bp[k][0..16) (row stride NR) = columns 0..16 of B at k, for column-major B (B(k, j) = col[j * csb + k]);
// columns at or past n are zero.
RLHF_FAST_AVX512 void pack_b_cols16(const float* col, int64_t csb, int64_t n, int64_t kc, float* bp) {
  __m512 r[16];
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    const int64_t rem = std::min<int64_t>(16, kc - k0);
    const __mmask16 km = rem == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rem) - 1);
    for (int j = 0; j < 16; ++j) r[j] = j < n ? _mm512_maskz_loadu_ps(km, col + j * csb + k0) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t kk = 0; kk < rem; ++kk) _mm512_storeu_ps(bp + (k0 + kk) * NR, r[kk]);
  }
}

// One NR panel: Bp[k][j] = B(k0 + k, j0 + j), zero past n
RLHF_FAST_AVX512 void pack_b_panel(const float* b, int64_t rsb, int64_t csb, int64_t n, int64_t kc, float* bp) {
  if (csb == 1 && n == NR) {  // row-major B: 32 contiguous floats per k
    for (int64_t k = 0; k < kc; ++k) {
      _mm512_storeu_ps(bp + k * NR, _mm512_loadu_ps(b + k * rsb));
      _mm512_storeu_ps(bp + k * NR + 16, _mm512_loadu_ps(b + k * rsb + 16));
    }
    return;
  }
  if (rsb == 1) {  // column-major B: each column contiguous in k, transposed 16 x 16 at a time
    for (int64_t j0 = 0; j0 < NR; j0 += 16) pack_b_cols16(b + j0 * csb, csb, n - j0, kc, bp + j0);
    return;
  }
  for (int64_t j = 0; j < NR; ++j) {  // any other layout, element by element
    if (j >= n) {
      for (int64_t k = 0; k < kc; ++k) bp[k * NR + j] = 0.0f;
      continue;
    }
    const float* src = b + j * csb;
    for (int64_t k = 0; k < kc; ++k) bp[k * NR + j] = src[k * rsb];
  }
}

// c[0:m, 0:n] = beta * c + Ap @ Bp (+ bias); m <= MR, n <= NR
RLHF_FAST_AVX512 void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float beta,
                                   const float* bias, int64_t m, int64_t n) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(bp + k * NR), b1 = _mm512_loadu_ps(bp + k * NR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ap[k * MR + r]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (bias) {
    bias0 = _mm512_maskz_loadu_ps(m0, bias);
    bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  const __m512 vbeta = _mm512_set1_ps(beta);
  for (int r = 0; r < MR && r < m; ++r) {
    float* row = c + r * ldc;
    __m512 v0 = _mm512_add_ps(acc[r][0], bias0), v1 = _mm512_add_ps(acc[r][1], bias1);
    if (beta != 0.0f) {  // beta == 0 never reads C (it may hold garbage)
      v0 = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(m0, row), v0);
      v1 = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(m1, row + 16), v1);
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

// One thread, the BLIS loop nest: jc (NC columns) -> pc (KC of K, pack B) -> ic (MC rows, pack A) -> micro-tiles
RLHF_FAST_AVX512 void gemm_seq(int64_t M, int64_t N, int64_t K, const float* a, int64_t rsa, int64_t csa,
                               const float* b, int64_t rsb, int64_t csb, float* c, int64_t ldc, float beta,
                               const float* bias, float* ap, float* bp) {
  const int64_t ncb = rsb == 1 && csb != 1 ? NC_COLMAJOR : NC;
  for (int64_t jc = 0; jc < N; jc += ncb) {
    const int64_t nc = std::min(ncb, N - jc), panels = (nc + NR - 1) / NR;
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const float beta_k = pc == 0 ? beta : 1.0f;
      const float* bias_k = pc == 0 && bias ? bias + jc : nullptr;
      for (int64_t p = 0; p < panels; ++p)
        pack_b_panel(b + pc * rsb + (jc + p * NR) * csb, rsb, csb, std::min(NR, nc - p * NR), kc, bp + p * NR * kc);
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = std::min(MC, M - ic), apanels = (mc + MR - 1) / MR;
        pack_a(a + ic * rsa + pc * csa, rsa, csa, mc, kc, ap);
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t j0 = jc + p * NR, n = std::min(NR, nc - p * NR);
          for (int64_t q = 0; q < apanels; ++q)
            micro_kernel(kc, ap + q * MR * kc, bp + p * NR * kc, c + (ic + q * MR) * ldc + j0, ldc, beta_k,
                         bias_k ? bias_k + p * NR : nullptr, std::min(MR, mc - q * MR), n);
        }
      }
    }
  }
}

// C = beta * C + A @ B (+ bias) with K split among the threads, for a long K and a small C (grad_hidden =
// g @ W: K = V): pieces of C would each stream the whole of the long operand again (one split of N per
// thread reads all of g, 1.2 GB a GEMM at C = 256, V = 151936), pieces of K read each operand once.
// Each thread sums its K pieces (dynamic, KC-aligned) into its own M x N buffer; the buffers are then
// added into C, rows in parallel.
RLHF_FAST_AVX512 void gemm_split_k(int64_t M, int64_t N, int64_t K, const float* a, int64_t rsa, int64_t csa,
                                   const float* b, int64_t rsb, int64_t csb, float* c, int64_t ldc, float beta,
                                   const float* bias, int nt) {
  const int64_t pieces = std::min<int64_t>(4 * nt, (K + KC - 1) / KC);
  const int64_t per = ((K + pieces - 1) / pieces + KC - 1) / KC * KC;
  // each thread's first piece writes its buffer with beta = 0, and unused ones are never read: no zero fill
  const std::unique_ptr<float[]> parts(new float[static_cast<size_t>(nt * M * N)]);
  std::vector<char> used(static_cast<size_t>(nt), 0);
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    std::vector<float> bpack(static_cast<size_t>(KC * std::min(NC, (N + NR - 1) / NR * NR)));
    std::vector<float> apack(static_cast<size_t>(KC * std::min(MC, (M + MR - 1) / MR * MR)));
    float* part = parts.get() + tid * M * N;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t lo = p * per, hi = std::min(K, lo + per);
      if (lo >= hi) continue;
      gemm_seq(M, N, hi - lo, a + lo * csa, rsa, csa, b + lo * rsb, rsb, csb, part, N, used[tid] ? 1.0f : 0.0f,
               nullptr, apack.data(), bpack.data());
      used[tid] = 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      float* row = c + i * ldc;
      for (int64_t j = 0; j < N; ++j) {
        float v = bias ? bias[j] : 0.0f;
        for (int t = 0; t < nt; ++t)
          if (used[t]) v += parts[(t * M + i) * N + j];
        row[j] = beta != 0.0f ? beta * row[j] + v : v;  // beta == 0 never reads C
      }
    }
  }
}

// Threads take independent pieces of C (no barrier, dynamic: robust to a core shared with other
// processes), split along the larger of M and N: splitting N repacks A (M x K) per piece,
// splitting M repacks B (K x N), so the smaller operand is the one packed again.
RLHF_FAST_AVX512 void gemm_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t rsa, int64_t csa,
                                const float* b, int64_t rsb, int64_t csb, float* c, int64_t ldc, float beta,
                                const float* bias, int nthreads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = beta * C + bias
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const float v = bias ? bias[j] : 0.0f;
        c[i * ldc + j] = beta != 0.0f ? beta * c[i * ldc + j] + v : v;
      }
    return;
  }
  const int nt = num_threads(nthreads);
  if (nt > 1 && K >= 8 * std::max(M, N) && M * N <= (int64_t{1} << 22)) {
    gemm_split_k(M, N, K, a, rsa, csa, b, rsb, csb, c, ldc, beta, bias, nt);
    return;
  }
  const bool split_n = N >= M;
  const int64_t unit = split_n ? NR : MR, extent = split_n ? N : M;
  const int64_t units = (extent + unit - 1) / unit;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(nt == 1 ? 1 : 4 * nt, units));
  const int64_t per = (units + pieces - 1) / pieces * unit;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> bpack(static_cast<size_t>(KC * std::min(NC, (N + NR - 1) / NR * NR)));
    std::vector<float> apack(static_cast<size_t>(KC * std::min(MC, (M + MR - 1) / MR * MR)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t lo = p * per, hi = std::min(extent, lo + per);
      if (lo >= hi) continue;
      if (split_n)
        gemm_seq(M, hi - lo, K, a, rsa, csa, b + lo * csb, rsb, csb, c + lo, ldc, beta, bias ? bias + lo : nullptr,
                 apack.data(), bpack.data());
      else
        gemm_seq(hi - lo, N, K, a + lo * rsa, rsa, csa, b, rsb, csb, c + lo * ldc, ldc, beta, bias, apack.data(),
                 bpack.data());
    }
  }
}

bool gemm_available() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"); }

void gemm_f32(int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t rsa, int64_t csa, uintptr_t b, int64_t rsb,
              int64_t csb, uintptr_t c, int64_t ldc, float beta, uintptr_t bias, int nthreads) {
  if (!gemm_available()) throw std::runtime_error("rlhf_fast gemm_f32 needs AVX-512 (see gemm_available())");
  gemm_impl(M, N, K, reinterpret_cast<const float*>(a), rsa, csa, reinterpret_cast<const float*>(b), rsb, csb,
            reinterpret_cast<float*>(c), ldc, beta, reinterpret_cast<const float*>(bias), nthreads);
}

void register_linear(py::module_& m) {
  m.def("gemm_available", &gemm_available, "whether gemm_f32 can run on this CPU (AVX-512)");
  m.def("gemm_f32", &gemm_f32, py::call_guard<py::gil_scoped_release>(),
        "C (M x N, ldc) = beta * C + A @ B (+ bias[j]); A(i,k) = a[i*rsa + k*csa], B(k,j) = b[k*rsb + j*csb]");
}

}  // namespace
RLHF_FAST_REGISTER(register_linear);

}  // namespace rlhf_fast
