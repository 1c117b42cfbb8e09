// Turn a blended accumulator slab into labels, confidence and per-class counts.
#pragma once
#include <cstdint>

#include "common.h"

namespace atso {

// acc (C, N) of acc_dtype with channel k at acc + k * chan_stride (chan_stride >= N, so a run
// of rows of a larger slab can be finalised in place), wsum (N) float32 -> labels (N) uint8 or uint16 (label_bytes 1|2),
// confidence (N) uint8 = round(max probability * 255). With K = max(C, 2) label classes (one
// sigmoid channel gives background/foreground), counts (K + 2) int64, zeroed by the caller:
// counts[k] voxels labelled k, counts[K] voxels below threshold, counts[K + 1] voxels with
// zero weight or non-finite values (both of those become ignore_index).
void finalize_cpu(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n, int64_t chan_stride,
                  float threshold, int64_t ignore_index, int kind, void* labels,
                  int label_bytes, uint8_t* confidence, int64_t* counts);

#ifdef WITH_CUDA
// Same contract; counts is a device buffer of (K + 2) int64, zeroed by the caller.
void finalize_cuda(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n, int64_t chan_stride,
                   float threshold, int64_t ignore_index, int kind, void* labels,
                   int label_bytes, uint8_t* confidence, int64_t* counts, uintptr_t stream);
#endif

}  // namespace atso
