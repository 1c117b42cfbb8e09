// CUDA window gather and gaussian-weighted accumulation.
//
// accumulate is a gather, not a scatter: one thread per slab voxel inside the batch's bounding
// box walks the batch's windows in order and adds those that cover it. No two threads write
// the same voxel, so there are no atomics and no races, the result is deterministic, and the
// accumulator is read and written once per batch instead of once per overlapping window.
// Products and sums use __fmul_rn/__fadd_rn so nvcc does not contract them into FMAs: the
// result then matches the CPU kernel bit for bit for float32 accumulators.
#include <algorithm>

#include "cuda_utils.cuh"
#include "stitch.h"

namespace atso {
namespace {

template <typename Out>
__global__ void extract_kernel(const float* __restrict__ volume, int64_t m, Shape3 vol,
                               Origins origins, int64_t bw, Shape3 p, float pad_value,
                               Out* __restrict__ out) {
  const int64_t win_n = p.z * p.y * p.x;
  const int64_t total = bw * m * win_n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t xx = i % p.x, yy = (i / p.x) % p.y, zz = (i / (p.x * p.y)) % p.z;
    const int64_t ch = (i / win_n) % m, w = i / (win_n * m);
    const int64_t z = origins.v[3 * w] + zz, y = origins.v[3 * w + 1] + yy,
                  x = origins.v[3 * w + 2] + xx;
    float v = pad_value;
    if (z >= 0 && z < vol.z && y >= 0 && y < vol.y && x >= 0 && x < vol.x) {
      v = volume[((ch * vol.z + z) * vol.y + y) * vol.x + x];
    }
    out[i] = from_float<Out>(v);
  }
}

constexpr int kChunk = 8;  // covering windows gathered per pass over the channels

template <typename A, typename P>
__global__ void accumulate_kernel(A* __restrict__ acc, float* __restrict__ wsum, int64_t c,
                                  Shape3 slab, int64_t z0, const P* __restrict__ patches,
                                  Origins origins, int64_t bw, Shape3 p,
                                  const float* __restrict__ importance, Shape3 box_lo,
                                  Shape3 box) {
  const int64_t win_n = p.z * p.y * p.x, slab_n = slab.z * slab.y * slab.x;
  const int64_t total = box.z * box.y * box.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = box_lo.x + i % box.x, y = box_lo.y + (i / box.x) % box.y,
                  z = box_lo.z + i / (box.x * box.y);
    const int64_t v = (z * slab.y + y) * slab.x + x;
    int w = 0;
    while (w < bw) {
      int idx[kChunk];
      int64_t off[kChunk];
      float wt[kChunk];
      int found = 0;
      for (; w < bw && found < kChunk; ++w) {
        const int64_t zz = z0 + z - origins.v[3 * w], yy = y - origins.v[3 * w + 1],
                      xx = x - origins.v[3 * w + 2];
        if (zz < 0 || zz >= p.z || yy < 0 || yy >= p.y || xx < 0 || xx >= p.x) continue;
        idx[found] = w;
        off[found] = (zz * p.y + yy) * p.x + xx;
        wt[found] = importance[off[found]];
        ++found;
      }
      if (found == 0) break;
      float ws = wsum[v];
      for (int k = 0; k < found; ++k) ws = __fadd_rn(ws, wt[k]);
      wsum[v] = ws;
      for (int64_t ch = 0; ch < c; ++ch) {
        float s = to_float(acc[ch * slab_n + v]);
        for (int k = 0; k < found; ++k) {
          const float pv = to_float(patches[((int64_t)idx[k] * c + ch) * win_n + off[k]]);
          // Round to the accumulator type after every window, as the CPU kernel does.
          s = to_float(from_float<A>(__fadd_rn(s, __fmul_rn(wt[k], pv))));
        }
        acc[ch * slab_n + v] = from_float<A>(s);
      }
    }
  }
}

// Bounding box, in slab coordinates, of the windows [first, first + count).
bool batch_box(const int64_t* origins, int64_t first, int64_t count, Shape3 p, Shape3 slab,
               int64_t z0, Shape3* lo, Shape3* size) {
  int64_t lz = INT64_MAX, ly = INT64_MAX, lx = INT64_MAX, hz = INT64_MIN, hy = INT64_MIN,
          hx = INT64_MIN;
  for (int64_t w = first; w < first + count; ++w) {
    const int64_t* o = origins + 3 * w;
    lz = std::min(lz, o[0] - z0), hz = std::max(hz, o[0] - z0 + p.z);
    ly = std::min(ly, o[1]), hy = std::max(hy, o[1] + p.y);
    lx = std::min(lx, o[2]), hx = std::max(hx, o[2] + p.x);
  }
  lz = std::max<int64_t>(lz, 0), ly = std::max<int64_t>(ly, 0), lx = std::max<int64_t>(lx, 0);
  hz = std::min(hz, slab.z), hy = std::min(hy, slab.y), hx = std::min(hx, slab.x);
  if (hz <= lz || hy <= ly || hx <= lx) return false;
  *lo = {lz, ly, lx};
  *size = {hz - lz, hy - ly, hx - lx};
  return true;
}

template <typename A, typename P>
void accumulate_launch(A* acc, float* wsum, int64_t c, Shape3 slab, int64_t z0, const P* patches,
                       const int64_t* origins, int64_t b, Shape3 p, const float* importance,
                       cudaStream_t stream) {
  const int64_t win_n = p.z * p.y * p.x;
  for (int64_t first = 0; first < b; first += kMaxWindows) {
    const int64_t count = std::min<int64_t>(kMaxWindows, b - first);
    Shape3 lo, box;
    if (!batch_box(origins, first, count, p, slab, z0, &lo, &box)) continue;
    const int threads = 256;
    accumulate_kernel<A, P><<<blocks_for(box.z * box.y * box.x, threads), threads, 0, stream>>>(
        acc, wsum, c, slab, z0, patches + first * c * win_n, pack_origins(origins, first, count),
        count, p, importance, lo, box);
    check_cuda(cudaGetLastError(), "accumulate");
  }
}

}  // namespace

void extract_patches_cuda(const float* volume, int64_t m, Shape3 vol, const int64_t* origins,
                          int64_t b, Shape3 p, float pad_value, void* out, int out_dtype,
                          uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t win_n = p.z * p.y * p.x;
  for (int64_t first = 0; first < b; first += kMaxWindows) {
    const int64_t count = std::min<int64_t>(kMaxWindows, b - first);
    const int threads = 256;
    const int blocks = blocks_for(count * m * win_n, threads);
    const Origins o = pack_origins(origins, first, count);
    if (out_dtype == kFloat16) {
      __half* dst = static_cast<__half*>(out) + first * m * win_n;
      extract_kernel<<<blocks, threads, 0, stream>>>(volume, m, vol, o, count, p, pad_value, dst);
    } else {
      float* dst = static_cast<float*>(out) + first * m * win_n;
      extract_kernel<<<blocks, threads, 0, stream>>>(volume, m, vol, o, count, p, pad_value, dst);
    }
    check_cuda(cudaGetLastError(), "extract_patches");
  }
}

void accumulate_cuda(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab, int64_t z0,
                     const void* patches, int patch_dtype, const int64_t* origins, int64_t b,
                     Shape3 p, const float* importance, uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const bool a16 = acc_dtype == kFloat16, p16 = patch_dtype == kFloat16;
  if (!a16 && !p16) {
    accumulate_launch(static_cast<float*>(acc), wsum, c, slab, z0,
                      static_cast<const float*>(patches), origins, b, p, importance, stream);
  } else if (!a16 && p16) {
    accumulate_launch(static_cast<float*>(acc), wsum, c, slab, z0,
                      static_cast<const __half*>(patches), origins, b, p, importance, stream);
  } else if (a16 && !p16) {
    accumulate_launch(static_cast<__half*>(acc), wsum, c, slab, z0,
                      static_cast<const float*>(patches), origins, b, p, importance, stream);
  } else {
    accumulate_launch(static_cast<__half*>(acc), wsum, c, slab, z0,
                      static_cast<const __half*>(patches), origins, b, p, importance, stream);
  }
}

}  // namespace atso
