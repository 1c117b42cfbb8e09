// Small helpers shared by the CUDA kernels.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace atso {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Windows per launch: their origins travel as a kernel parameter (3 x int32 each, 1.5 KiB),
// so no device allocation or host->device copy is needed per batch.
constexpr int kMaxWindows = 128;
struct Origins {
  int32_t v[3 * kMaxWindows];
};

inline Origins pack_origins(const int64_t* origins, int64_t first, int64_t count) {
  Origins o{};
  for (int64_t i = 0; i < 3 * count; ++i) o.v[i] = (int32_t)origins[3 * first + i];
  return o;
}

inline int blocks_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return (int)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

}  // namespace atso
