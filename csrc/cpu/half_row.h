// float16 row conversion for the blocked CPU kernels: F16C in the AVX2 build (compiled with
// -mf16c), the shared scalar conversion (ops/half.h) or a lookup table built from it elsewhere.
// All give the same bits.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/half.h"

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
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

}  // namespace atso
