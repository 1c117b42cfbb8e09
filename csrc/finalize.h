// Turn a blended accumulator slab into labels, confidence and per-class counts (finalize), or
// into per-channel probabilities (probabilities): the argument structs and the implementations
// (blocked CPU in cpu/finalize_cpu.cpp via cpu_kernels(), CUDA in cuda/finalize_cuda.cu, the
// CUDA per-voxel body looped on the host in cpu/host_path.cpp; all three call
// ops/finalize_math.h).
#pragma once
#include <cstdint>
#include <string>

#include "common.h"

namespace atso {

// acc (C, N) of acc_dtype with channel k at acc + k * chan_stride (chan_stride >= N, so a run
// of rows of a larger slab is finalised in place), wsum (N) float32 -> labels (N) uint8 or
// uint16 (label_bytes 1|2), confidence (N) uint8 = round(max probability * 255). With
// K = max(C, 2) label classes (one sigmoid channel gives background/foreground), counts
// (K + 2) int64 on the host, zeroed by the caller: counts[k] voxels labelled k, counts[K]
// voxels below threshold, counts[K + 1] voxels with zero weight or non-finite values (both of
// those become ignore_index).
//
// The declared arguments (common.h), in this order: each a field below, filled from the Python
// keyword of its name by finalize.cpp. Array rule `slab`: acc's spatial shape (Zs, Y, X), from
// the first finalised row. The scalars are a list of their own because resample_finalize
// (resample.cpp) takes them too: a new scalar here reaches both kernels. Those the value rules
// of ops/finalize_math.h read (blended value, invalid voxel, softmax or sigmoid) are a list of
// their own again because probabilities takes them too: a new one there reaches all three.
#define ATSO_FINALIZE_VALUE_SCALARS(SCALAR, ARRAY) \
  SCALAR(Kind, kind, kind_arg)
#define ATSO_FINALIZE_SCALARS(SCALAR, ARRAY)    \
  SCALAR(float, threshold, unit_interval_arg)   \
  SCALAR(int64_t, ignore_index, int_arg)        \
  ATSO_FINALIZE_VALUE_SCALARS(SCALAR, ARRAY)
#define ATSO_FINALIZE_ARGS(SCALAR, ARRAY)       \
  ARRAY(float, wsum, "float32", slab)           \
  ATSO_FINALIZE_SCALARS(SCALAR, ARRAY)
#define ATSO_PROBABILITIES_ARGS(SCALAR, ARRAY)  \
  ARRAY(float, wsum, "float32", slab)           \
  ATSO_FINALIZE_VALUE_SCALARS(SCALAR, ARRAY)

struct FinalizeArgs {
  const void* acc;
  DType acc_dtype;
  int64_t c;
  int64_t n;
  int64_t chan_stride;
  void* labels;
  int label_bytes;
  uint8_t* confidence;
  int64_t* counts;
  ATSO_ARG_FIELDS(ATSO_FINALIZE_ARGS)
};

// The blended probabilities of the voxels finalize would classify: f's acc, acc_dtype, c, n,
// chan_stride, wsum and kind as finalize reads them (its outputs, threshold and ignore_index
// unused) -> out (C, N) float32, channel k at out + k * n, by the element rules finalize's
// confidence comes from (ops/finalize_math.h: probabilities_voxel): softmax over channels, or
// for one channel the sigmoid of its logit, or the blended values themselves for kind
// probabilities. A voxel finalize counts invalid (zero or non-finite weight, a non-finite value)
// is NaN in every channel. The channel finalize labels has the largest probability, and
// round(that * 255) is finalize's confidence (C >= 2, or C == 1 where the label is 1).
struct ProbabilitiesArgs {
  FinalizeArgs f;
  float* out;
};

// The label dtype ("uint8" | "uint16") of K = max(channels, 2) classes and ignore_index;
// ValueError when ignore_index is a class or above 65535.
std::string label_dtype(int64_t channels, int64_t ignore_index);

void finalize_host(const FinalizeArgs& a);
void probabilities_host(const ProbabilitiesArgs& a);
#ifdef WITH_CUDA
// counts stays a host pointer: the CUDA implementation histograms on the device and copies the
// counts back (synchronising the stream).
void finalize_cuda(const FinalizeArgs& a, uintptr_t stream);
// Stream-ordered, no synchronisation (no host output).
void probabilities_cuda(const ProbabilitiesArgs& a, uintptr_t stream);
#endif

}  // namespace atso
