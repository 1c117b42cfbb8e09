// IEEE half <-> float, the same bits on the host and the device; storage type of float16 data
// is uint16_t everywhere (CPU, CUDA and the host build of the CUDA path).
//
// Host: bit arithmetic, so the baseline CPU build needs no F16C; round-to-nearest-even like
// numpy.float16, and bit-identical to F16C (NaNs included), which the AVX2 build uses in its
// inner loops (cpu/half_row.h). Device: the hardware conversions, which are exact (half ->
// float) and correctly rounded to nearest even (float -> half, subnormals and overflow to inf
// included) for every non-NaN value, so they agree with the host bit for bit; NaNs, whose
// payload the hardware may canonicalise, take the host rule below on both sides.
#pragma once
#include <cstdint>

#include "common.h"
#include "ops/hd.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace atso {

// NaN rules (as F16C): half -> float keeps the payload and sets the quiet bit; float -> half
// keeps the payload's top 10 bits and sets the quiet bit.
ATSO_HD inline uint32_t half_nan_to_float_bits(uint16_t h) {
  return ((uint32_t)(h & 0x8000u) << 16) | 0x7FC00000u | ((uint32_t)(h & 0x3FFu) << 13);
}
ATSO_HD inline uint16_t float_nan_to_half_bits(uint32_t x) {
  return (uint16_t)(((x >> 16) & 0x8000u) | 0x7E00u | ((x >> 13) & 0x3FFu));
}

inline float half_bits_to_float_host(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = mant ? half_nan_to_float_bits(h) : (sign | 0x7F800000u);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  return bits_to_float(bits);
}

inline uint16_t float_to_half_bits_host(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx > 0x7F800000u) return float_nan_to_half_bits(x);
  if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // inf, or rounds to inf
  if (absx < 0x38800000u) {  // subnormal or zero in half
    if (absx < 0x33000000u) return (uint16_t)sign;
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // half subnormals are multiples of 2^-24
    uint32_t half_m = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_m & 1u))) ++half_m;
    return (uint16_t)(sign | half_m);
  }
  uint32_t h = ((absx >> 13) - (112u << 10));
  const uint32_t rem = absx & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(sign | h);
}

ATSO_HD inline float half_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0) return bits_to_float(half_nan_to_float_bits(h));
  return __half2float(__ushort_as_half(h));
#else
  return half_bits_to_float_host(h);
#endif
}

ATSO_HD inline uint16_t float_to_half(float f) {
#ifdef __CUDA_ARCH__
  if (f != f) return float_nan_to_half_bits(float_to_bits(f));
  return __half_as_ushort(__float2half_rn(f));
#else
  return float_to_half_bits_host(f);
#endif
}

// Element access for the two storage types: float32 as float, float16 as uint16_t bits.
ATSO_HD inline float to_float(float v) { return v; }
ATSO_HD inline float to_float(uint16_t h) { return half_to_float(h); }

template <typename T>
ATSO_HD inline T from_float(float v);
template <>
ATSO_HD inline float from_float<float>(float v) { return v; }
template <>
ATSO_HD inline uint16_t from_float<uint16_t>(float v) { return float_to_half(v); }

// v rounded to storage type T and back (the identity for float32).
template <typename T>
ATSO_HD inline float round_to(float v) { return to_float(from_float<T>(v)); }

// bfloat16 storage: the top 16 bits of a float32, so reading one is exact (a shift). Only
// window patches come in bfloat16 (a network's output); accumulators stay float32/float16.
struct bf16_t {
  uint16_t bits;
};
ATSO_HD inline float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }
ATSO_HD inline float to_float(bf16_t v) { return bf16_to_float(v.bits); }
template <>
ATSO_HD inline bf16_t load_ro(const bf16_t* p) {
  return bf16_t{load_ro(reinterpret_cast<const uint16_t*>(p))};
}

// Calls f(T{}) with T the storage type of dtype d (host code: the kernels' type switch).
template <typename F>
inline void with_float_type(DType d, F&& f) {
  if (d == kFloat16) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}

// with_float_type for window patches, which may also be bfloat16.
template <typename F>
inline void with_patch_type(DType d, F&& f) {
  if (d == kBFloat16) {
    f(bf16_t{});
  } else {
    with_float_type(d, f);
  }
}

}  // namespace atso
