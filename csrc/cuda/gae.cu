// GAE on CUDA (semantics: rlhf_fast/ops/advantages.py gae_ref). One warp per row; the row is
// walked from the end in chunks of 32 * kPer positions, each lane owning kPer consecutive ones.
//
// With the state x = (A, V) = (advantage, value) of the next valid position, a valid position t
// maps x to (gamma * lam * A + gamma * V + r_t - v_t, v_t); a masked one is the identity. Such
// maps compose as x -> (a A + b V + e, d V + f) (Affine2). Per chunk: each lane composes its
// kPer maps (backwards in time), the warp scans the lanes' maps from lane 31 (latest) down to
// lane 0 with shuffles, every lane applies the maps of the lanes after it to the chunk's carry,
// then walks its kPer positions backwards writing A and R = A + v.
#include "common.cuh"

namespace rlhf_fast {
namespace {

struct Affine2 {
  float a, b, d, e, f;
};

__device__ __forceinline__ Affine2 identity2() { return Affine2{1.f, 0.f, 1.f, 0.f, 0.f}; }

// p applied first (later in time), then q
__device__ __forceinline__ Affine2 then(Affine2 p, Affine2 q) {
  return Affine2{q.a * p.a, q.a * p.b + q.b * p.d, q.d * p.d, q.a * p.e + q.b * p.f + q.e, q.d * p.f + q.f};
}

__device__ __forceinline__ Affine2 shfl_down2(Affine2 m, int off) {
  const unsigned full = 0xffffffffu;
  return Affine2{__shfl_down_sync(full, m.a, off), __shfl_down_sync(full, m.b, off),
                 __shfl_down_sync(full, m.d, off), __shfl_down_sync(full, m.e, off),
                 __shfl_down_sync(full, m.f, off)};
}

__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(p)[i];
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kInt32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case kInt64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
    default: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);  // bool / uint8
  }
}

constexpr int kWarps = 4;  // rows per block
constexpr int kPer = 8;    // positions per lane per chunk
constexpr int kChunkT = 32 * kPer;

__global__ void __launch_bounds__(32 * kWarps)
gae_kernel(const void* rew, int r_dt, int64_t r_s,  // (B, T) rows at row * r_s
           const void* val, int v_dt, int64_t v_s,  // (B, T) rows at row * v_s
           const void* mask, int m_dt, int64_t m_s,  // (B, T) rows at row * m_s, valid where != 0
           int64_t B, int64_t T, float gamma, float gl,
           float* adv, float* ret) {  // (B, T) fp32 contiguous out
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= B) return;  // uniform per warp: every shuffle below has all 32 lanes
  float carry_a = 0.f, carry_v = 0.f;
  for (int64_t end = T; end > 0; end -= kChunkT) {
    const int64_t first = end - kChunkT + static_cast<int64_t>(lane) * kPer;  // this lane's first t (may be < 0)
    float r[kPer], v[kPer];
    bool ok[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t t = first + k;
      ok[k] = t >= 0 && load_any(mask, m_dt, row * m_s + t) != 0.f;
      r[k] = ok[k] ? load_any(rew, r_dt, row * r_s + t) : 0.f;
      v[k] = ok[k] ? load_any(val, v_dt, row * v_s + t) : 0.f;
    }
    Affine2 m = identity2();
#pragma unroll
    for (int k = kPer - 1; k >= 0; --k)
      if (ok[k]) m = then(m, Affine2{gl, gamma, 0.f, r[k] - v[k], v[k]});
    // inclusive scan: lane l ends with the maps of lanes 31, 30, ..., l composed (31 first)
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const Affine2 o = shfl_down2(m, off);
      if (lane + off < 32) m = then(o, m);
    }
    Affine2 after = shfl_down2(m, 1);  // lanes l+1..31: what runs before this lane's positions
    if (lane == 31) after = identity2();
    float na = after.a * carry_a + after.b * carry_v + after.e;
    float nv = after.d * carry_v + after.f;
    const float next_ca = __shfl_sync(0xffffffffu, m.a * carry_a + m.b * carry_v + m.e, 0);
    const float next_cv = __shfl_sync(0xffffffffu, m.d * carry_v + m.f, 0);
#pragma unroll
    for (int k = kPer - 1; k >= 0; --k) {
      const int64_t t = first + k;
      if (t < 0) continue;
      const int64_t o = row * T + t;
      if (ok[k]) {
        const float a = gl * na + gamma * nv + (r[k] - v[k]);
        adv[o] = a;
        ret[o] = a + v[k];
        na = a;
        nv = v[k];
      } else {
        adv[o] = 0.f;
        ret[o] = 0.f;
      }
    }
    carry_a = next_ca;
    carry_v = next_cv;
  }
}

}  // namespace
}  // namespace rlhf_fast

// advantages / returns (B, T) fp32 contiguous; inputs (B, T) with unit stride along T.
extern "C" int rlhf_gae(const void* rewards, int r_dtype, int64_t r_stride, const void* values, int v_dtype,
                        int64_t v_stride, const void* mask, int m_dtype, int64_t m_stride, int64_t B, int64_t T,
                        float gamma, float lam, void* advantages, void* returns, void* stream, int device) {
  using namespace rlhf_fast;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (B == 0 || T == 0) return 0;
  const int64_t blocks = (B + kWarps - 1) / kWarps;
  gae_kernel<<<static_cast<unsigned>(blocks), 32 * kWarps, 0, static_cast<cudaStream_t>(stream)>>>(
      rewards, r_dtype, r_stride, values, v_dtype, v_stride, mask, m_dtype, m_stride, B, T, gamma, gamma * lam,
      static_cast<float*>(advantages), static_cast<float*>(returns));
  return static_cast<int>(cudaGetLastError());
}
