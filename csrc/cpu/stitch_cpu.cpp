// CPU (OpenMP) window gather and gaussian-weighted accumulation.
//
// accumulate: each thread owns whole slab rows z, and inside a row adds the windows in batch
// order. No two threads write the same voxel (no atomics, no races) and every voxel sees the
// same addition order as the NumPy reference, so results are deterministic.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/half_row.h"
#include "cpu/isa.h"
#include "stitch.h"

namespace atso {
namespace ATSO_ISA {
namespace {

// 64 Ki-entry table: half -> float conversion is one load in the inner loops.
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float((uint16_t)i);
    return t;
  }();
  return table.data();
}

struct Range {
  int64_t lo, hi;  // [lo, hi) in destination coordinates
};

inline Range clip(int64_t origin, int64_t size, int64_t lo, int64_t hi) {
  return {std::max(origin, lo), std::min(origin + size, hi)};
}

template <typename Out>
inline Out to_out(float v);
template <>
inline float to_out<float>(float v) { return v; }
template <>
inline uint16_t to_out<uint16_t>(float v) { return float_to_half_bits(v); }

template <typename Out>
void extract_impl(const float* volume, int64_t m, Shape3 vol, const int64_t* origins, int64_t b,
                  Shape3 p, float pad_value, Out* out) {
  const int64_t rows = b * m * p.z;
  const Out pad = to_out<Out>(pad_value);
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t zz = r % p.z, ch = (r / p.z) % m, w = r / (p.z * m);
    const int64_t oz = origins[3 * w], oy = origins[3 * w + 1], ox = origins[3 * w + 2];
    Out* dst = out + r * p.y * p.x;
    const int64_t z = oz + zz;
    const Range xr = clip(ox, p.x, 0, vol.x);
    for (int64_t yy = 0; yy < p.y; ++yy) {
      Out* row = dst + yy * p.x;
      const int64_t y = oy + yy;
      if (z < 0 || z >= vol.z || y < 0 || y >= vol.y || xr.lo >= xr.hi) {
        std::fill(row, row + p.x, pad);
        continue;
      }
      const float* src = volume + ((ch * vol.z + z) * vol.y + y) * vol.x;
      std::fill(row, row + (xr.lo - ox), pad);
      for (int64_t x = xr.lo; x < xr.hi; ++x) row[x - ox] = to_out<Out>(src[x]);
      std::fill(row + (xr.hi - ox), row + p.x, pad);
    }
  }
}

template <typename A>
inline void add_row(A* acc, const float* imp, const float* src, int64_t n, const float* table);

template <>
inline void add_row<float>(float* acc, const float* imp, const float* src, int64_t n, const float*) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += imp[i] * src[i];
}
template <>
inline void add_row<uint16_t>(uint16_t* acc, const float* imp, const float* src, int64_t n,
                              const float* table) {
  int64_t i = 0;
#ifdef ATSO_F16C
  // Hardware half conversion (same bits as float_to_half_bits); multiply then add, no FMA,
  // like the scalar loop under -ffp-contract=off.
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + i)));
    const __m256 w = _mm256_mul_ps(_mm256_loadu_ps(imp + i), _mm256_loadu_ps(src + i));
    const __m128i h = _mm256_cvtps_ph(_mm256_add_ps(a, w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + i), h);
  }
#endif
  for (; i < n; ++i) acc[i] = float_to_half_bits(table[acc[i]] + imp[i] * src[i]);
}

// A window's overlap with one (z, y) row of the slab.
struct Span {
  int64_t w;        // window index in the batch
  int64_t src_off;  // offset of the row's first covered voxel inside the window
  int64_t x0, n;    // destination x start and length
};

// Per-thread scratch: the spans of one slab row z, grouped by y (span_start[y] ..).
struct RowSpans {
  std::vector<Span> spans;
  std::vector<int64_t> start;
  std::vector<float> buf;  // float16 patch row converted to float
};

void collect_spans(int64_t z0, int64_t z, const int64_t* origins, int64_t b, Shape3 p,
                   Shape3 slab, RowSpans& rs) {
  rs.spans.clear();
  rs.start.assign(slab.y + 1, 0);
  for (int64_t y = 0; y < slab.y; ++y) {
    rs.start[y] = (int64_t)rs.spans.size();
    for (int64_t w = 0; w < b; ++w) {
      const int64_t zz = z0 + z - origins[3 * w], yy = y - origins[3 * w + 1];
      if (zz < 0 || zz >= p.z || yy < 0 || yy >= p.y) continue;
      const int64_t ox = origins[3 * w + 2];
      const Range xr = clip(ox, p.x, 0, slab.x);
      if (xr.hi > xr.lo) {
        rs.spans.push_back({w, (zz * p.y + yy) * p.x + (xr.lo - ox), xr.lo, xr.hi - xr.lo});
      }
    }
  }
  rs.start[slab.y] = (int64_t)rs.spans.size();
}

// One slab row z (volume row z0 + z) receives every window of the batch that covers it.
// Loop order channel -> y -> window: each window's patch plane is read as one sequential
// stream (B streams per channel, prefetch friendly), and the X-long accumulator row gets all
// overlapping windows while it sits in L1, so it crosses the memory bus once per batch rather
// than once per window. Every voxel still receives the windows in batch order.
template <typename A, typename P>
void accumulate_row(A* acc, float* wsum, int64_t c, Shape3 slab, int64_t z0, int64_t z,
                    const P* patches, const int64_t* origins, int64_t b, Shape3 p,
                    const float* importance, const float* table, RowSpans& rs) {
  collect_spans(z0, z, origins, b, p, slab, rs);
  if (rs.spans.empty()) return;
  const int64_t plane = slab.y * slab.x, slab_n = slab.z * plane, win_n = p.z * p.y * p.x;
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int64_t y = 0; y < slab.y; ++y) {
      A* row = acc + ch * slab_n + z * plane + y * slab.x;
      float* ws = wsum + z * plane + y * slab.x;
      for (int64_t k = rs.start[y]; k < rs.start[y + 1]; ++k) {
        const Span& s = rs.spans[k];
        const float* imp = importance + s.src_off;
        if (ch == 0) {
          // The weight sum rides along with the first channel, whose importance row is
          // already in L1 (a separate pass over the slab row cost ~10% at 3 classes).
          float* dst = ws + s.x0;
#pragma omp simd
          for (int64_t i = 0; i < s.n; ++i) dst[i] += imp[i];
        }
        const P* src = patches + (s.w * c + ch) * win_n + s.src_off;
        const float* srcf;
        if constexpr (std::is_same<P, float>::value) {
          srcf = src;
        } else {
          half_to_float_row(src, s.n, rs.buf.data(), table);
          srcf = rs.buf.data();
        }
        add_row<A>(row + s.x0, imp, srcf, s.n, table);
      }
    }
  }
}

template <typename A, typename P>
void accumulate_impl(A* acc, float* wsum, int64_t c, Shape3 slab, int64_t z0, const P* patches,
                     const int64_t* origins, int64_t b, Shape3 p, const float* importance) {
  const float* table = half_table();
#pragma omp parallel num_threads(kernel_threads())
  {
    RowSpans rs;
    rs.buf.resize(p.x);
    rs.spans.reserve(b * slab.y);
#pragma omp for schedule(dynamic, 1)
    for (int64_t z = 0; z < slab.z; ++z) {
      accumulate_row<A, P>(acc, wsum, c, slab, z0, z, patches, origins, b, p, importance, table, rs);
    }
  }
}

}  // namespace

void extract_patches_cpu(const float* volume, int64_t m, Shape3 vol, const int64_t* origins,
                         int64_t b, Shape3 patch, float pad_value, void* out, int out_dtype) {
  if (out_dtype == kFloat16) {
    extract_impl(volume, m, vol, origins, b, patch, pad_value, static_cast<uint16_t*>(out));
  } else {
    extract_impl(volume, m, vol, origins, b, patch, pad_value, static_cast<float*>(out));
  }
}

void accumulate_cpu(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab, int64_t z0,
                    const void* patches, int patch_dtype, const int64_t* origins, int64_t b,
                    Shape3 patch, const float* importance) {
  const bool acc16 = acc_dtype == kFloat16, p16 = patch_dtype == kFloat16;
  if (!acc16 && !p16) {
    accumulate_impl(static_cast<float*>(acc), wsum, c, slab, z0, static_cast<const float*>(patches),
                    origins, b, patch, importance);
  } else if (!acc16 && p16) {
    accumulate_impl(static_cast<float*>(acc), wsum, c, slab, z0,
                    static_cast<const uint16_t*>(patches), origins, b, patch, importance);
  } else if (acc16 && !p16) {
    accumulate_impl(static_cast<uint16_t*>(acc), wsum, c, slab, z0,
                    static_cast<const float*>(patches), origins, b, patch, importance);
  } else {
    accumulate_impl(static_cast<uint16_t*>(acc), wsum, c, slab, z0,
                    static_cast<const uint16_t*>(patches), origins, b, patch, importance);
  }
}

}  // namespace ATSO_ISA
}  // namespace atso
