// Per-voxel math of resample_finalize: the two-tap linear step of aten's CPU bilinear kernel
// (upsample_bilinear2d, align_corners=False, its generic N-d loop), written once for the
// blocked CPU kernel and a future CUDA one.
//
// aten computes each output as t0 * w0 + t1 * w1 per axis (x inside, then y), and its CPU build
// contracts that into fma(t0, w0, t1 * w1). Measured against torch 2.13 (AVX-512 kernels) on
// random planes: this expression, in this order, reproduces its outputs bit for bit
// (tests/test_resample_finalize.py keeps checking it), so labels stay those of the unfused path
// (torch's bilinear, then finalize). The fused multiply-add is explicit here, so the kernels'
// -ffp-contract=off does not change it, and the other steps still round one at a time.
#pragma once
#include <cmath>

#include "ops/hd.h"

namespace atso {

// t0 * w0 + t1 * w1 as aten rounds it: the second product rounded, then one fused step.
ATSO_HD inline float linear2(float t0, float w0, float t1, float w1) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(t0, w0, __fmul_rn(t1, w1));
#else
  return std::fma(t0, w0, mul_rn(t1, w1));
#endif
}

}  // namespace atso
