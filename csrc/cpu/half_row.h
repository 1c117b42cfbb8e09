// float16 row conversion for the CPU kernels: F16C in the AVX2 build (compiled with -mf16c),
// scalar bit arithmetic (or a lookup table) elsewhere. Both give the same bits (common.h).
#pragma once
#include <cstdint>

#include "common.h"

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define ATSO_F16C 1
#endif

namespace atso {

// dst[i] = float(src[i]) for i < n; table (65536 floats) speeds up the scalar path when given.
inline void half_to_float_row(const uint16_t* src, int64_t n, float* dst, const float* table = nullptr) {
  int64_t i = 0;
#ifdef ATSO_F16C
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = table ? table[src[i]] : half_bits_to_float(src[i]);
}

}  // namespace atso
