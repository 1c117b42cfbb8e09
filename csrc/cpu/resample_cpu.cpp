// Blocked CPU (OpenMP) resample_finalize: blended target rows (C, R, Yt, Xt) -> bilinear onto
// (Yn, Xn) -> labels, confidence, per-class counts, without the C x R x Yn x Xn intermediate.
//
// Work items are output lines (r, y), in order, split into one contiguous run per thread. A line
// reads two input lines (r, y0[y]) and (r, y1[y]); each is first resampled along x for every
// class into a per-thread cache of two slots (C x Xn floats each, about 215 KB at C = 105 and
// Xn = 512), so consecutive output lines reuse it (about 1.9 output lines per input line at
// 1.5 -> 0.8 mm). Then blocks of kBlock voxels: the y step into vals (C x nb, contiguous loads),
// and the shared decision (cpu/finalize_block.h). Every value is aten's: linear2 along x, then
// along y (ops/resample_math.h); finalize's unit weight divides nothing, so no division here.
#include <algorithm>
#include <vector>

#include "cpu/finalize_block.h"
#include "cpu/isa.h"
#include "ops/resample_math.h"
#include "resample.h"

namespace atso {
namespace ATSO_ISA {
namespace {

// Two x-resampled input lines, tagged by (r, y) of the input; the least recently filled is reused.
struct LineCache {
  std::vector<float> data[2];
  int64_t tag[2] = {-1, -1};
  int next = 0;
};

// Input line (r, yi) resampled along x for every class: C x Xn floats, from the cache or filled.
const float* x_line(const ResampleFinalizeArgs& a, LineCache& cache, int64_t r, int64_t yi, int64_t keep) {
  const int64_t tag = r * a.y.n_in + yi;
  for (int s = 0; s < 2; ++s) {
    if (cache.tag[s] == tag) return cache.data[s].data();
  }
  int s = cache.next;
  if (cache.tag[s] == keep) s ^= 1;  // never evict the other line of this output line
  cache.next = s ^ 1;
  cache.tag[s] = tag;
  float* dst = cache.data[s].data();
  const Taps& t = a.x;
  const int64_t plane = a.y.n_in * t.n_in;
  for (int64_t c = 0; c < a.out.c; ++c) {
    const float* src = a.rows + (c * a.r + r) * plane + yi * t.n_in;
    float* out = dst + c * t.n_out;
    for (int64_t o = 0; o < t.n_out; ++o) out[o] = linear2(src[t.i0[o]], t.w0[o], src[t.i1[o]], t.w1[o]);
  }
  return dst;
}

// Output line (r, y): the y step per block, then the decision.
template <typename L>
void output_line(const ResampleFinalizeArgs& a, LineCache& cache, int64_t r, int64_t y, float* vals,
                 int64_t* counts) {
  const int64_t i0 = a.y.i0[y], i1 = a.y.i1[y];
  const float w0 = a.y.w0[y], w1 = a.y.w1[y];
  const float* l0 = x_line(a, cache, r, i0, -1);
  const float* l1 = x_line(a, cache, r, i1, r * a.y.n_in + i0);
  const int64_t xn = a.x.n_out, line = (r * a.y.n_out + y) * xn;
  uint8_t invalid[kBlock];
  for (int64_t s = 0; s < xn; s += kBlock) {
    const int64_t nb = std::min(kBlock, xn - s);
    for (int64_t j = 0; j < nb; ++j) invalid[j] = 0;
    for (int64_t c = 0; c < a.out.c; ++c) {
      const float* p0 = l0 + c * xn + s;
      const float* p1 = l1 + c * xn + s;
      float* dst = vals + c * nb;
      for (int64_t j = 0; j < nb; ++j) {
        const float v = linear2(p0[j], w0, p1[j], w1);
        dst[j] = v;
        invalid[j] |= !finite(v);
      }
    }
    decide_and_write<L>(a.out, line + s, nb, vals, invalid, counts);
  }
}

template <typename L>
void resample_finalize_impl(const ResampleFinalizeArgs& a) {
  const FinalizeArgs& f = a.out;
  const int64_t n_counts = (f.c == 1 ? 2 : f.c) + 2;
  const int64_t lines = a.r * a.y.n_out;
#pragma omp parallel num_threads(kernel_threads())
  {
    LineCache cache;
    for (auto& d : cache.data) d.resize(f.c * a.x.n_out);
    std::vector<float> vals(f.c * kBlock);
    std::vector<int64_t> local(n_counts, 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < lines; ++t) {
      output_line<L>(a, cache, t / a.y.n_out, t % a.y.n_out, vals.data(), local.data());
    }
#pragma omp critical
    for (int64_t k = 0; k < n_counts; ++k) f.counts[k] += local[k];
  }
}

}  // namespace

void resample_finalize_cpu(const ResampleFinalizeArgs& a) {
  if (a.out.label_bytes == 2) {
    resample_finalize_impl<uint16_t>(a);
  } else {
    resample_finalize_impl<uint8_t>(a);
  }
}

}  // namespace ATSO_ISA
}  // namespace atso
