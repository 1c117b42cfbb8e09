// Window gather (extract_patches) and gaussian-weighted accumulation (accumulate): the argument
// structs every implementation takes, and the implementations. Pointers are host pointers for
// the CPU kernels and the host build of the CUDA path, device pointers for *_cuda; origins always
// live on the host (they are tiny, and they bound the launch grid).
//
// Implementations of each kernel: blocked CPU loops (cpu/stitch_cpu.cpp, one build per ISA,
// reached through cpu_kernels() of cpu/isa.h), the CUDA kernels (cuda/stitch_cuda.cu), and a
// host loop over the CUDA kernels' per-thread bodies (cpu/host_path.cpp). All three call the
// element math of ops/stitch_math.h. stitch.cpp parses the Python arguments into these structs
// and picks one implementation.
#pragma once
#include <cstdint>

#include "common.h"

namespace atso {

// volume (M, Z, Y, X) float32 -> out (B, M, pz, py, px) of out_dtype; voxels outside the
// volume get pad_value. origins (B, 3) int64 window starts (z, y, x), may be negative.
// The declared arguments (common.h): each a field below, filled from the Python keyword of its
// name by stitch.cpp.
#define ATSO_EXTRACT_ARGS(SCALAR, ARRAY) SCALAR(float, pad_value, float32_arg)

struct ExtractArgs {
  const float* volume;
  int64_t m;
  Shape3 vol;
  const int64_t* origins;
  int64_t b;
  Shape3 patch;
  void* out;
  DType out_dtype;
  ATSO_ARG_FIELDS(ATSO_EXTRACT_ARGS)
};

// acc (C, Zs, Y, X) of acc_dtype += importance * patches, restricted to the slab of volume
// rows [z0, z0 + Zs); wsum (Zs, Y, X) float32 += importance. patches (B, C, pz, py, px) of
// patch_dtype. Every voxel receives the windows in batch order (deterministic), the
// accumulator rounded to its dtype after each window.
// The declared arguments, as above. Array rule `window`: the patches' (pz, py, px).
#define ATSO_ACCUMULATE_ARGS(SCALAR, ARRAY)     \
  ARRAY(float, importance, "float32", window)   \
  SCALAR(int64_t, z0, int_arg)

struct AccumulateArgs {
  void* acc;
  DType acc_dtype;
  float* wsum;
  int64_t c;
  Shape3 slab;
  const void* patches;
  DType patch_dtype;
  const int64_t* origins;
  int64_t b;
  Shape3 patch;
  ATSO_ARG_FIELDS(ATSO_ACCUMULATE_ARGS)
};

void extract_patches_host(const ExtractArgs& a);
void accumulate_host(const AccumulateArgs& a);
#ifdef WITH_CUDA
void extract_patches_cuda(const ExtractArgs& a, uintptr_t stream);
void accumulate_cuda(const AccumulateArgs& a, uintptr_t stream);
#endif

}  // namespace atso
