// Scalar loads of any dtype code and the parallel threshold shared by the advantage-side
// CPU kernels (gae.cpp, whiten.cpp, group_advantages.cpp).
#pragma once
#include <type_traits>
#include <utility>

#include "common.h"

namespace rlhf_fast {

// Below this many elements a parallel region costs more than it saves (thread wake-up,
// and on a loaded machine a worker that is not scheduled stalls the barrier).
constexpr int64_t kParallelMin = 1 << 15;

// Any dtype code as float; used where a loop is sequential anyway (the GAE recurrence).
inline float load_any(uintptr_t base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32: return reinterpret_cast<const float*>(base)[i];
    case kFloat16: return f16_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
    case kBFloat16: return bf16_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
    case kInt32: return static_cast<float>(reinterpret_cast<const int32_t*>(base)[i]);
    case kInt64: return static_cast<float>(reinterpret_cast<const int64_t*>(base)[i]);
    case kBool:
    case kUInt8: return static_cast<float>(reinterpret_cast<const uint8_t*>(base)[i]);
    default: throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
  }
}

// Typed loads for the vectorizable loops: floating types via load_f32, integers by value.
template <typename T> inline float load_val(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>)
    return load_f32(p, i);
  else
    return static_cast<float>(p[i]);
}

template <typename Fn>
inline void dispatch_any(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat16: fn(static_cast<half_t*>(nullptr)); break;
    case kBFloat16: fn(static_cast<bf16_t*>(nullptr)); break;
    case kInt32: fn(static_cast<int32_t*>(nullptr)); break;
    case kInt64: fn(static_cast<int64_t*>(nullptr)); break;
    case kBool:
    case kUInt8: fn(static_cast<uint8_t*>(nullptr)); break;
    default: throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
  }
}

inline void check_code(uintptr_t ptr, int dtype) {  // before a parallel region: no throwing inside one
  if (ptr != 0 && (dtype < kFloat32 || dtype > kUInt8))
    throw std::invalid_argument("rlhf_fast._C: unsupported dtype code " + std::to_string(dtype));
}

}  // namespace rlhf_fast
