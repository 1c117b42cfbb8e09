// Resample blended rows back to the scan's plane and finalise them in one pass: the argument
// struct of resample_finalize (the blocked CPU kernel in cpu/resample_cpu.cpp via cpu_kernels();
// its per-voxel math in ops/resample_math.h and ops/finalize_math.h).
#pragma once
#include <cstdint>

#include "finalize.h"

namespace atso {

// Two taps per output index along one axis: output o reads inputs i0[o] and i1[o] with weights
// w0[o] and w1[o] (every index in [0, n_in)).
struct Taps {
  const int64_t* i0;
  const int64_t* i1;
  const float* w0;
  const float* w1;
  int64_t n_in, n_out;
};

// rows (C, R, Yt, Xt) float32 contiguous -> labels/confidence (R, Yn, Xn) and counts, exactly
// as bilinear resampling of every (c, r) plane to (Yn, Xn) (ops/resample_math.h) followed by
// finalize with unit weights: out.c = C, out.n = R * Yn * Xn, out.acc/wsum unused.
struct ResampleFinalizeArgs {
  const float* rows;
  int64_t r;  // rows per class
  Taps y, x;
  FinalizeArgs out;
};

}  // namespace atso
