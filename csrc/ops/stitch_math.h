// Element math of extract_patches and accumulate, written once for the CPU kernels, the CUDA
// kernels and the host build of the CUDA path, plus the CUDA path's launch plan (which windows
// go to which launch, over which bounding box), which is host code shared by the CUDA launcher
// and its host build. What stays GPU-only is thread indexing (cuda/stitch_cuda.cu).
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>

#include "ops/half.h"
#include "ops/hd.h"
#include "stitch.h"

namespace atso {

struct Range {
  int64_t lo, hi;  // [lo, hi) in destination coordinates
};

ATSO_HD inline Range clip(int64_t origin, int64_t size, int64_t lo, int64_t hi) {
  return {origin > lo ? origin : lo, origin + size < hi ? origin + size : hi};
}

// The element rules. Each takes its kernel's argument struct, so that an option of a rule
// reaches the blocked CPU kernel, the CUDA kernel and its host build through this one function.

// extract_patches: a volume value (or pad_value) as stored in the window batch.
template <typename Out>
ATSO_HD inline Out extract_value(const ExtractArgs&, float v) {
  return from_float<Out>(v);
}

// accumulate, one window's contribution to one voxel: multiply, round, add, round (never one
// fused multiply-add), then the caller rounds to the accumulator's dtype. V is float, or 8
// float lanes (__m256) in the AVX2 build's float16 loop, so that loop runs this rule too.
template <typename V>
ATSO_HD inline V accumulate_step(const AccumulateArgs&, V acc, V weight, V value) {
  return add_rn(acc, mul_rn(weight, value));
}
ATSO_HD inline float weight_step(const AccumulateArgs&, float wsum, float weight) { return add_rn(wsum, weight); }

// ---------------------------------------------------------------- the CUDA path's plan
// Windows per launch: their origins travel as a kernel parameter (3 x int32 each, 1.5 KiB), so
// no device allocation or host->device copy is needed per batch. stitch.cpp checks that
// origins fit in int32.
constexpr int kMaxWindows = 128;
struct Origins {
  int32_t v[3 * kMaxWindows];
};

inline Origins pack_origins(const int64_t* origins, int64_t first, int64_t count) {
  Origins o{};
  for (int64_t i = 0; i < 3 * count; ++i) o.v[i] = (int32_t)origins[3 * first + i];
  return o;
}

// Calls f(first, count, packed origins) for each launch of extract_patches.
template <typename F>
inline void for_each_extract_launch(const ExtractArgs& a, F&& f) {
  for (int64_t first = 0; first < a.b; first += kMaxWindows) {
    const int64_t count = std::min<int64_t>(kMaxWindows, a.b - first);
    f(first, count, pack_origins(a.origins, first, count));
  }
}

// Bounding box, in slab coordinates, of the windows [first, first + count); false if empty.
inline bool batch_box(const AccumulateArgs& a, int64_t first, int64_t count, Shape3* lo, Shape3* size) {
  int64_t lz = INT64_MAX, ly = INT64_MAX, lx = INT64_MAX, hz = INT64_MIN, hy = INT64_MIN, hx = INT64_MIN;
  for (int64_t w = first; w < first + count; ++w) {
    const int64_t* o = a.origins + 3 * w;
    lz = std::min(lz, o[0] - a.z0), hz = std::max(hz, o[0] - a.z0 + a.patch.z);
    ly = std::min(ly, o[1]), hy = std::max(hy, o[1] + a.patch.y);
    lx = std::min(lx, o[2]), hx = std::max(hx, o[2] + a.patch.x);
  }
  lz = std::max<int64_t>(lz, 0), ly = std::max<int64_t>(ly, 0), lx = std::max<int64_t>(lx, 0);
  hz = std::min(hz, a.slab.z), hy = std::min(hy, a.slab.y), hx = std::min(hx, a.slab.x);
  if (hz <= lz || hy <= ly || hx <= lx) return false;
  *lo = {lz, ly, lx};
  *size = {hz - lz, hy - ly, hx - lx};
  return true;
}

// Calls f(first, count, packed origins, box origin, box size) for each launch of accumulate
// whose windows meet the slab.
template <typename F>
inline void for_each_accumulate_launch(const AccumulateArgs& a, F&& f) {
  for (int64_t first = 0; first < a.b; first += kMaxWindows) {
    const int64_t count = std::min<int64_t>(kMaxWindows, a.b - first);
    Shape3 lo, box;
    if (batch_box(a, first, count, &lo, &box)) f(first, count, pack_origins(a.origins, first, count), lo, box);
  }
}

// ---------------------------------------------------------------- per-thread bodies
// Element i of launch [first, first + count) of the window batch (B, M, pz, py, px): the
// volume voxel it covers, or pad_value outside the volume.
template <typename Out>
ATSO_HD inline void extract_element(const ExtractArgs& a, const Origins& o, int64_t first, int64_t i) {
  const Shape3 p = a.patch, vol = a.vol;
  const int64_t win_n = p.z * p.y * p.x;
  const int64_t xx = i % p.x, yy = (i / p.x) % p.y, zz = (i / (p.x * p.y)) % p.z;
  const int64_t ch = (i / win_n) % a.m, w = i / (win_n * a.m);
  const int64_t z = o.v[3 * w] + zz, y = o.v[3 * w + 1] + yy, x = o.v[3 * w + 2] + xx;
  float v = a.pad_value;
  if (z >= 0 && z < vol.z && y >= 0 && y < vol.y && x >= 0 && x < vol.x) {
    v = load_ro(a.volume + ((ch * vol.z + z) * vol.y + y) * vol.x + x);
  }
  static_cast<Out*>(a.out)[first * a.m * win_n + i] = extract_value<Out>(a, v);
}

// Covering windows gathered per pass over the channels (registers per thread on the GPU).
constexpr int kChunk = 8;

// Slab voxel (z, y, x) receives every window of launch [first, first + count) that covers it,
// in batch order: a gather, so no two threads write the same voxel (no atomics, no races) and
// the voxel is read and written once per kChunk covering windows instead of once per window.
template <typename A, typename P>
ATSO_HD inline void accumulate_voxel(const AccumulateArgs& a, const Origins& o, int64_t first, int count,
                                     int64_t z, int64_t y, int64_t x) {
  const Shape3 p = a.patch, s = a.slab;
  const int64_t win_n = p.z * p.y * p.x, slab_n = s.z * s.y * s.x, v = (z * s.y + y) * s.x + x;
  A* acc = static_cast<A*>(a.acc);
  const P* patches = static_cast<const P*>(a.patches);
  int w = 0;
  while (w < count) {
    int64_t idx[kChunk], off[kChunk];
    float wt[kChunk];
    int found = 0;
    for (; w < count && found < kChunk; ++w) {
      const int64_t zz = a.z0 + z - o.v[3 * w], yy = y - o.v[3 * w + 1], xx = x - o.v[3 * w + 2];
      if (zz < 0 || zz >= p.z || yy < 0 || yy >= p.y || xx < 0 || xx >= p.x) continue;
      idx[found] = first + w;
      off[found] = (zz * p.y + yy) * p.x + xx;
      wt[found] = load_ro(a.importance + off[found]);
      ++found;
    }
    if (found == 0) break;
    float ws = a.wsum[v];
    for (int k = 0; k < found; ++k) ws = weight_step(a, ws, wt[k]);
    a.wsum[v] = ws;
    for (int64_t ch = 0; ch < a.c; ++ch) {
      float sum = to_float(acc[ch * slab_n + v]);
      for (int k = 0; k < found; ++k) {
        const float pv = to_float(load_ro(patches + (idx[k] * a.c + ch) * win_n + off[k]));
        sum = round_to<A>(accumulate_step(a, sum, wt[k], pv));  // rounded after every window
      }
      acc[ch * slab_n + v] = from_float<A>(sum);
    }
  }
}

}  // namespace atso
