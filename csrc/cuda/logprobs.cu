// Token log-probs and entropy from logits (CUDA). One block per row, 16-byte loads,
// online softmax statistics per thread merged across the block. Same math as
// csrc/cpu/logprobs.cpp and the Triton kernels in rlhf_fast/ops/logprobs.py, including the
// logit transform (logit_coefs there): z = x * mul, or with a softcap (cap_pre != 0)
// z = tanh(x * cap_pre) * mul, so dz/dx = mul * cap_pre * (1 - tanh^2).
#include "common.cuh"

namespace rlhf_fast {

constexpr int kThreads = 512;

__device__ __forceinline__ float logit_z(float x, float mul, float cap_pre) {
  return cap_pre != 0.f ? tanhf(x * cap_pre) * mul : x * mul;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(
    const T* __restrict__ x, RowLayout lay, const void* __restrict__ targets, int t_dtype, int64_t V,
    float inv_temp, float cap_pre, float* __restrict__ logp, float* __restrict__ lse_out, float* __restrict__ ent) {
  const int64_t r = blockIdx.x;
  const T* row = x + lay.offset(r);
  Stats st{-INFINITY, 0.f, 0.f};
  int bad = 0;  // NaN / +inf logits: the row has no softmax (NaN out, as torch); kept out of the stats
  for_each_in_row<T, kThreads>(row, V, [&](int64_t, float v) {
    const float z = logit_z(v, inv_temp, cap_pre);
    const bool nonfinite = isnan(z) || z == INFINITY;
    bad |= nonfinite;
    stats_push(st, nonfinite ? -INFINITY : z);
  });
  st = block_reduce_stats<kThreads>(st);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    const float log_s = bad || st.s == 0.f ? NAN : logf(st.s);  // all -inf: no softmax either
    const float lse = st.m + log_s;
    const int64_t t = load_index(targets, t_dtype, r);
    const float lp = (logit_z(to_f32(row[t]), inv_temp, cap_pre) - st.m) - log_s;  // exact subtraction first
    logp[r] = lp > 0.f ? 0.f : lp;  // not fminf: NaN must stay NaN
    lse_out[r] = lse;
    if (ent) {
      const float h = log_s - st.a / st.s;
      ent[r] = h < 0.f ? 0.f : h;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(
    const T* x, RowLayout lay, T* gx, RowLayout glay,  // x may alias gx (inplace_backward)
    const void* __restrict__ targets, int t_dtype,
    int64_t V, float inv_temp, float cap_pre, const float* __restrict__ lse, const float* __restrict__ ent,
    const float* __restrict__ g_lp, const float* __restrict__ g_ent) {
  const int64_t r = blockIdx.x;
  const T* row = x + lay.offset(r);
  T* grow = gx + glay.offset(r);
  const int64_t t = load_index(targets, t_dtype, r);
  const float l = lse[r], glp = g_lp[r];
  const float ge = g_ent ? g_ent[r] : 0.f, shift = g_ent ? ent[r] - l : 0.f;
  const bool zero_row = glp == 0.f && ge == 0.f;  // no upstream gradient (a masked row): 0, never 0 * NaN
  for_each_in_row<T, kThreads>(row, V, [&](int64_t j, float v) {
    const float th = cap_pre != 0.f ? tanhf(v * cap_pre) : 0.f;
    const float z = cap_pre != 0.f ? th * inv_temp : v * inv_temp;
    const float p = __expf(z - l);
    float g = glp * ((j == t ? 1.f : 0.f) - p);
    if (g_ent && p > 0.f) g -= ge * p * (z + shift);
    if (zero_row) g = 0.f;
    const float dz_dx = cap_pre != 0.f ? inv_temp * cap_pre * (1.f - th * th) : inv_temp;
    grow[j] = from_f32<T>(g * dz_dx);  // may alias row: element j was read above
  });
}

}  // namespace rlhf_fast

using namespace rlhf_fast;

extern "C" int rlhf_logprobs_fwd(const void* x, int dtype, int64_t inner, int64_t s_outer, int64_t s_inner,
                                 const void* targets, int t_dtype, int64_t n_rows, int64_t V, float inv_temp,
                                 float cap_pre, float* logp, float* lse, float* ent, void* stream, int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const RowLayout lay{inner, s_outer, s_inner};
  RLHF_FAST_DISPATCH_FLOAT(dtype, T,
    logprobs_fwd_kernel<T><<<n_rows, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), lay, targets, t_dtype, V, inv_temp, cap_pre, logp, lse, ent));
  return static_cast<int>(cudaGetLastError());
}

extern "C" int rlhf_logprobs_bwd(const void* x, int dtype, int64_t inner, int64_t s_outer, int64_t s_inner,
                                 void* gx, int64_t g_inner, int64_t g_s_outer, int64_t g_s_inner,
                                 const void* targets, int t_dtype, int64_t n_rows, int64_t V, float inv_temp,
                                 float cap_pre, const float* lse, const float* ent, const float* g_lp, const float* g_ent,
                                 void* stream, int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const RowLayout lay{inner, s_outer, s_inner}, glay{g_inner, g_s_outer, g_s_inner};
  RLHF_FAST_DISPATCH_FLOAT(dtype, T,
    logprobs_bwd_kernel<T><<<n_rows, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), lay, static_cast<T*>(gx), glay, targets, t_dtype, V, inv_temp, cap_pre, lse, ent, g_lp,
        g_ent));
  return static_cast<int>(cudaGetLastError());
}
