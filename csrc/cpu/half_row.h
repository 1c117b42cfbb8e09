// float16 and bfloat16 row conversion for the blocked CPU kernels. float16: F16C in the AVX2
// build (compiled with -mf16c), the shared scalar conversion (ops/half.h) or a lookup table
// built from it elsewhere; bfloat16: a 16-bit shift (AVX2 or scalar). All give the same bits.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/half.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__AVX2__)
#define ATSO_F16C 1
#endif

namespace atso {

// 64 Ki-entry table of half_to_float: a float16 element is one load in the scalar loops.
inline const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_to_float((uint16_t)i);
    return t;
  }();
  return table.data();
}

// dst[i] = float(src[i]) for i < n.
inline void half_to_float_row(const uint16_t* src, int64_t n, float* dst, const float* table) {
  int64_t i = 0;
#ifdef ATSO_F16C
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = table[src[i]];
}

// dst[i] = float(src[i]) for i < n, bfloat16 src (exact: the bits move up 16 places).
inline void bf16_to_float_row(const bf16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace atso
