// Blocked CPU (OpenMP) window gather and gaussian-weighted accumulation.
//
// accumulate: each thread owns whole slab rows z, and inside a row adds the windows in batch
// order. No two threads write the same voxel (no atomics, no races) and every voxel sees the
// same addition order as the NumPy reference and the CUDA gather, so results are deterministic
// and, with the shared step of ops/stitch_math.h, bit-identical to the CUDA path.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/half_row.h"
#include "cpu/isa.h"
#include "ops/stitch_math.h"

namespace atso {
namespace ATSO_ISA {
namespace {

template <typename Out>
void extract_impl(const ExtractArgs& a) {
  const Shape3 p = a.patch, vol = a.vol;
  const int64_t rows = a.b * a.m * p.z;
  const Out pad = extract_value<Out>(a, a.pad_value);
  Out* out = static_cast<Out*>(a.out);
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t zz = r % p.z, ch = (r / p.z) % a.m, w = r / (p.z * a.m);
    const int64_t* o = a.origins + 3 * w;
    const int64_t z = o[0] + zz, ox = o[2];
    const Range xr = clip(ox, p.x, 0, vol.x);
    for (int64_t yy = 0; yy < p.y; ++yy) {
      Out* row = out + (r * p.y + yy) * p.x;
      const int64_t y = o[1] + yy;
      if (z < 0 || z >= vol.z || y < 0 || y >= vol.y || xr.lo >= xr.hi) {
        std::fill(row, row + p.x, pad);
        continue;
      }
      const float* src = a.volume + ((ch * vol.z + z) * vol.y + y) * vol.x;
      std::fill(row, row + (xr.lo - ox), pad);
      for (int64_t x = xr.lo; x < xr.hi; ++x) row[x - ox] = extract_value<Out>(a, src[x]);
      std::fill(row + (xr.hi - ox), row + p.x, pad);
    }
  }
}

// acc[i] = round_to<A>(accumulate_step(acc[i], imp[i], src[i])) for i < n.
inline void add_row(const AccumulateArgs& a, float* acc, const float* imp, const float* src, int64_t n,
                    const float*) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = accumulate_step(a, acc[i], imp[i], src[i]);
}
inline void add_row(const AccumulateArgs& a, uint16_t* acc, const float* imp, const float* src, int64_t n,
                    const float* table) {
  int64_t i = 0;
#ifdef ATSO_F16C
  // accumulate_step in 8 lanes, between hardware half conversions (the same bits as ops/half.h).
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + i)));
    const __m256 next = accumulate_step(a, sum, _mm256_loadu_ps(imp + i), _mm256_loadu_ps(src + i));
    const __m128i h = _mm256_cvtps_ph(next, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + i), h);
  }
#endif
  for (; i < n; ++i) acc[i] = from_float<uint16_t>(accumulate_step(a, table[acc[i]], imp[i], src[i]));
}

// A window's overlap with one (z, y) row of the slab.
struct Span {
  int64_t w;        // window index in the batch
  int64_t src_off;  // offset of the row's first covered voxel inside the window
  int64_t x0, n;    // destination x start and length
};

// Per-thread scratch: the spans of one slab row z, grouped by y (start[y] ..).
struct RowSpans {
  std::vector<Span> spans;
  std::vector<int64_t> start;
  std::vector<float> buf;  // float16/bfloat16 patch row converted to float
};

void collect_spans(int64_t z0, int64_t z, const int64_t* origins, int64_t b, Shape3 p, Shape3 slab,
                   RowSpans& rs) {
  rs.spans.clear();
  rs.start.assign(slab.y + 1, 0);
  for (int64_t y = 0; y < slab.y; ++y) {
    rs.start[y] = (int64_t)rs.spans.size();
    for (int64_t w = 0; w < b; ++w) {
      const int64_t zz = z0 + z - origins[3 * w], yy = y - origins[3 * w + 1];
      if (zz < 0 || zz >= p.z || yy < 0 || yy >= p.y) continue;
      const int64_t ox = origins[3 * w + 2];
      const Range xr = clip(ox, p.x, 0, slab.x);
      if (xr.hi > xr.lo) rs.spans.push_back({w, (zz * p.y + yy) * p.x + (xr.lo - ox), xr.lo, xr.hi - xr.lo});
    }
  }
  rs.start[slab.y] = (int64_t)rs.spans.size();
}

// One slab row z (volume row z0 + z) receives every window of the batch that covers it.
// Loop order channel -> y -> window: each window's patch plane is read as one sequential
// stream (B streams per channel, prefetch friendly), and the X-long accumulator row gets all
// overlapping windows while it sits in L1, so it crosses the memory bus once per batch rather
// than once per window. Every voxel still receives the windows in batch order. (The struct's
// fields come as plain arguments too: read through the struct, the inner loop spilled a
// register; the struct itself goes on to the element rules.)
template <typename A, typename P>
void accumulate_row(const AccumulateArgs& a, A* acc, float* wsum, int64_t c, Shape3 slab, int64_t z0, int64_t z,
                    const P* patches, const int64_t* origins, int64_t b, Shape3 p, const float* importance,
                    const float* table, RowSpans& rs) {
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
          for (int64_t i = 0; i < s.n; ++i) dst[i] = weight_step(a, dst[i], imp[i]);
        }
        const P* src = patches + (s.w * c + ch) * win_n + s.src_off;
        const float* srcf;
        if constexpr (std::is_same<P, float>::value) {
          srcf = src;
        } else if constexpr (std::is_same<P, bf16_t>::value) {
          bf16_to_float_row(src, s.n, rs.buf.data());
          srcf = rs.buf.data();
        } else {
          half_to_float_row(src, s.n, rs.buf.data(), table);
          srcf = rs.buf.data();
        }
        add_row(a, row + s.x0, imp, srcf, s.n, table);
      }
    }
  }
}

template <typename A, typename P>
void accumulate_impl(const AccumulateArgs& a) {
  const float* table = half_table();
  A* acc = static_cast<A*>(a.acc);
  const P* patches = static_cast<const P*>(a.patches);
#pragma omp parallel num_threads(kernel_threads())
  {
    RowSpans rs;
    rs.buf.resize(a.patch.x);
    rs.spans.reserve(a.b * a.slab.y);
#pragma omp for schedule(dynamic, 1)
    for (int64_t z = 0; z < a.slab.z; ++z) {
      accumulate_row<A, P>(a, acc, a.wsum, a.c, a.slab, a.z0, z, patches, a.origins, a.b, a.patch, a.importance,
                           table, rs);
    }
  }
}

}  // namespace

void extract_patches_cpu(const ExtractArgs& a) {
  with_float_type(a.out_dtype, [&](auto out) { extract_impl<decltype(out)>(a); });
}

void accumulate_cpu(const AccumulateArgs& a) {
  with_float_type(a.acc_dtype, [&](auto acc) {
    with_patch_type(a.patch_dtype, [&](auto patch) { accumulate_impl<decltype(acc), decltype(patch)>(a); });
  });
}

}  // namespace ATSO_ISA
}  // namespace atso
