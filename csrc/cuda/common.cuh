// Shared helpers for the CUDA kernels in rlhf_fast/_cuda_kernels.so (plain nvcc, C ABI).
// Every exported launcher is `extern "C" int rlhf_<op>(..., void* stream, int device)` and
// returns a cudaError_t; rlhf_fast/_backend.py loads the library with ctypes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cfloat>

namespace rlhf_fast {

// Codes shared with rlhf_fast/_backend.py DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kBool = 5, kUInt8 = 6 };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t load_index(const void* p, int dtype, int64_t i) {
  return dtype == kInt64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

struct RowLayout {
  int64_t inner, s_outer, s_inner;
  __device__ __forceinline__ int64_t offset(int64_t r) const { return (r / inner) * s_outer + (r % inner) * s_inner; }
};

// Running softmax statistics: m = max z, s = sum exp(z - m), a = sum exp(z - m) * (z - m).
struct Stats {
  float m, s, a;
};

__device__ __forceinline__ Stats stats_merge(Stats x, Stats y) {
  float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return x;
  float ax = x.s > 0.f ? __expf(x.m - m) : 0.f;
  float ay = y.s > 0.f ? __expf(y.m - m) : 0.f;
  Stats r;
  r.m = m;
  r.s = ax * x.s + ay * y.s;
  r.a = (x.s > 0.f ? ax * (x.a + (x.m - m) * x.s) : 0.f) + (y.s > 0.f ? ay * (y.a + (y.m - m) * y.s) : 0.f);
  return r;
}

// Folds one value into running stats (online softmax, one element).
__device__ __forceinline__ void stats_push(Stats& st, float z) {
  if (z == -INFINITY) return;
  if (st.s == 0.f) {
    st = Stats{z, 1.f, 0.f};
  } else if (z > st.m) {
    float alpha = __expf(st.m - z);
    st.a = alpha * (st.a + (st.m - z) * st.s);
    st.s = alpha * st.s + 1.f;
    st.m = z;
  } else {
    float d = z - st.m;
    float e = __expf(d);
    st.s += e;
    st.a += e * d;
  }
}

template <int kThreads>
__device__ __forceinline__ Stats block_reduce_stats(Stats st) {
  __shared__ Stats smem[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
            __shfl_xor_sync(0xffffffffu, st.a, off)};
    st = stats_merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? smem[lane] : Stats{-INFINITY, 0.f, 0.f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Stats o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
              __shfl_xor_sync(0xffffffffu, st.a, off)};
      st = stats_merge(st, o);
    }
    if (lane == 0) smem[0] = st;
  }
  __syncthreads();
  Stats out = smem[0];
  __syncthreads();
  return out;
}

// Loads a row in 16-byte vectors where aligned, calling fn(j, value) for every element j < V.
template <typename T, int kThreads, typename Fn>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t V, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = (addr % 16 == 0) ? 0 : (16 - addr % 16) / sizeof(T);
  if (head > V) head = V;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) fn(j, to_f32(row[j]));
  const int64_t n_vec = (V - head) / kVec;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    uint4 raw = vrow[i];
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) fn(head + i * kVec + k, to_f32(vals[k]));
  }
  for (int64_t j = head + n_vec * kVec + threadIdx.x; j < V; j += kThreads) fn(j, to_f32(row[j]));
}

#define RLHF_FAST_DISPATCH_FLOAT(dtype, T, ...)                      \
  switch (dtype) {                                                   \
    case kFloat32: { using T = float; __VA_ARGS__; break; }          \
    case kFloat16: { using T = __half; __VA_ARGS__; break; }         \
    case kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return static_cast<int>(cudaErrorInvalidValue);         \
  }

}  // namespace rlhf_fast
