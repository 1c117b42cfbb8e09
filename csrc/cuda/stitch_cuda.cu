// CUDA window gather and gaussian-weighted accumulation: thread indexing and launches only.
// The per-thread bodies (extract_element, accumulate_voxel) and the launch plan (which windows
// per launch, over which bounding box) are ops/stitch_math.h, which cpu/host_path.cpp also runs
// on the host, so CI tests this algorithm without a GPU. accumulate is a gather: one thread per
// slab voxel of the launch's bounding box walks the launch's windows in batch order.
#include "cuda/cuda_utils.cuh"
#include "ops/stitch_math.h"

namespace atso {
namespace {

template <typename Out>
__global__ void extract_kernel(ExtractArgs a, Origins o, int64_t first, int64_t total) {
  ATSO_GRID_STRIDE_LOOP(i, total) extract_element<Out>(a, o, first, i);
}

template <typename A, typename P>
__global__ void accumulate_kernel(AccumulateArgs a, Origins o, int64_t first, int count, Shape3 lo, Shape3 box) {
  ATSO_GRID_STRIDE_LOOP(i, box.z * box.y * box.x) {
    const int64_t x = lo.x + i % box.x, y = lo.y + (i / box.x) % box.y, z = lo.z + i / (box.x * box.y);
    accumulate_voxel<A, P>(a, o, first, count, z, y, x);
  }
}

}  // namespace

void extract_patches_cuda(const ExtractArgs& a, uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t win_n = a.patch.z * a.patch.y * a.patch.x;
  with_float_type(a.out_dtype, [&](auto out) {
    for_each_extract_launch(a, [&](int64_t first, int64_t count, const Origins& o) {
      const int64_t total = count * a.m * win_n;
      extract_kernel<decltype(out)><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(a, o, first, total);
      check_cuda(cudaGetLastError(), "extract_patches");
    });
  });
}

void accumulate_cuda(const AccumulateArgs& a, uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_float_type(a.acc_dtype, [&](auto acc) {
    with_patch_type(a.patch_dtype, [&](auto patch) {
      using A = decltype(acc);
      using P = decltype(patch);
      for_each_accumulate_launch(a, [&](int64_t first, int64_t count, const Origins& o, Shape3 lo, Shape3 box) {
        const int blocks = blocks_for(box.z * box.y * box.x, kThreads);
        accumulate_kernel<A, P><<<blocks, kThreads, 0, stream>>>(a, o, first, (int)count, lo, box);
        check_cuda(cudaGetLastError(), "accumulate");
      });
    });
  });
}

}  // namespace atso
