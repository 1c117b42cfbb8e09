// Window gather (extract_patches) and gaussian-weighted accumulation (accumulate).
// CPU and CUDA versions share these signatures; pointers are host pointers for *_cpu and
// device pointers for *_cuda (origins always live on the host: they are tiny and also
// bound the launch grid).
#pragma once
#include <cstdint>

#include "common.h"

namespace atso {

// volume (M, Z, Y, X) float32 -> out (B, M, pz, py, px) of out_dtype; voxels outside the
// volume get pad_value. origins (B, 3) int64 window starts (z, y, x), may be negative.
void extract_patches_cpu(const float* volume, int64_t m, Shape3 vol, const int64_t* origins,
                         int64_t b, Shape3 patch, float pad_value, void* out, int out_dtype);

// acc (C, Zs, Y, X) of acc_dtype += importance * patches, restricted to the slab of volume
// rows [z0, z0 + Zs); wsum (Zs, Y, X) float32 += importance. patches (B, C, pz, py, px) of
// patch_dtype. Windows are added in batch order for every voxel (deterministic).
void accumulate_cpu(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab, int64_t z0,
                    const void* patches, int patch_dtype, const int64_t* origins, int64_t b,
                    Shape3 patch, const float* importance);

#ifdef WITH_CUDA
void extract_patches_cuda(const float* volume, int64_t m, Shape3 vol, const int64_t* origins,
                          int64_t b, Shape3 patch, float pad_value, void* out, int out_dtype,
                          uintptr_t stream);
void accumulate_cuda(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab, int64_t z0,
                     const void* patches, int patch_dtype, const int64_t* origins, int64_t b,
                     Shape3 patch, const float* importance, uintptr_t stream);
#endif

}  // namespace atso
