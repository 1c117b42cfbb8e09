// Host/device building blocks of the per-voxel math: ATSO_HD and IEEE single-precision operations
// that round after every step on both sides.
//
// ATSO_HD marks a function compiled for the host and (under nvcc) for the device, the pattern of
// MONAI's csrc/utils/resample_utils.h and PyTorch's C10_HOST_DEVICE. Every floating-point step
// of the kernels' math goes through mul_rn/add_rn/sub_rn/div_rn: on the device these are the
// round-to-nearest intrinsics, which nvcc never contracts into an FMA; on the host plain
// operators, which the build compiles with -ffp-contract=off (never fused either). So one
// expression gives the same bits on the CPU and on the GPU, with two exceptions: NaN payloads
// (x86 returns an operand's NaN, and which operand the compiler puts first is its choice; the GPU
// returns its canonical NaN), and a host thread whose floating-point environment flushes
// subnormals (FTZ/DAZ, e.g. torch.set_flush_denormal(True)), which the GPU build does not do.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ATSO_HD __host__ __device__
#else
#define ATSO_HD
#endif

#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace atso {

ATSO_HD inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ATSO_HD inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ATSO_HD inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

ATSO_HD inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ATSO_HD inline float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

ATSO_HD inline uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
#endif
}

// The same two operations on 8 float lanes, for the AVX2 build of the blocked CPU kernels: a
// template rule written with mul_rn/add_rn (accumulate_step) runs on __m256 unchanged there.
#if defined(__AVX2__) && !defined(__CUDACC__)
inline __m256 mul_rn(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 add_rn(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
#endif

// False for inf and NaN (a NaN compares false). fabsf and a comparison: exact on both sides,
// and vectorised on the host.
ATSO_HD inline bool finite(float v) { return fabsf(v) <= FLT_MAX; }

// Read-only load through the read-only data cache on the device, a plain load on the host.
template <typename T>
ATSO_HD inline T load_ro(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

}  // namespace atso
