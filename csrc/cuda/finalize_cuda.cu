// CUDA finalisation: one thread per voxel, channels read coalesced (adjacent threads hold
// adjacent voxels of the same channel), online softmax so the accumulator is read once.
// Per-class counts go to a shared-memory histogram per block, then one atomicAdd per bin.
#include <algorithm>

#include "cuda_utils.cuh"
#include "finalize.h"

namespace atso {
namespace {

constexpr int kSharedBins = 2048;

struct Voxel {
  int64_t label;  // class index, or -1 below threshold, -2 invalid
  uint8_t confidence;
};

template <typename A>
__device__ Voxel decide(const A* __restrict__ acc, float w, int64_t c, int64_t stride, int64_t v,
                        float threshold, int kind) {
  bool bad = !(w > 0.0f) || !isfinite(w);
  int64_t best = 0;
  float prob;
  if (c == 1) {
    const float x = to_float(acc[v]) / w;
    bad = bad || !isfinite(x);
    const float p = kind == kLogits ? 1.0f / (1.0f + expf(-x)) : x;
    best = p > 0.5f ? 1 : 0;
    prob = p > 0.5f ? p : 1.0f - p;
  } else {
    float m = -INFINITY, s = 0.0f;
    for (int64_t k = 0; k < c; ++k) {
      const float x = to_float(acc[k * stride + v]) / w;
      if (!isfinite(x)) bad = true;
      if (x > m) {
        s = (kind == kLogits ? s * expf(m - x) + 1.0f : 0.0f);
        m = x;
        best = k;
      } else if (kind == kLogits) {
        s += expf(x - m);
      }
    }
    prob = kind == kLogits ? 1.0f / s : m;
  }
  if (bad || !isfinite(prob)) return {-2, 0};
  const float sc = fminf(fmaxf(floorf(prob * 255.0f + 0.5f), 0.0f), 255.0f);
  return {prob < threshold ? -1 : best, (uint8_t)sc};
}

template <typename A, typename L>
__global__ void finalize_kernel(const A* __restrict__ acc, const float* __restrict__ wsum,
                                int64_t c, int64_t n, int64_t stride, float threshold,
                                int64_t ignore_index,
                                int kind, L* __restrict__ labels, uint8_t* __restrict__ confidence,
                                unsigned long long* __restrict__ counts, int64_t n_counts) {
  __shared__ unsigned int hist[kSharedBins];
  const bool shared_hist = n_counts <= kSharedBins;
  if (shared_hist) {
    for (int64_t k = threadIdx.x; k < n_counts; k += blockDim.x) hist[k] = 0;
    __syncthreads();
  }
  const int64_t k_classes = n_counts - 2;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n;
       v += (int64_t)gridDim.x * blockDim.x) {
    const Voxel r = decide(acc, wsum[v], c, stride, v, threshold, kind);
    const int64_t bin = r.label >= 0 ? r.label : (r.label == -1 ? k_classes : k_classes + 1);
    labels[v] = (L)(r.label >= 0 ? r.label : ignore_index);
    confidence[v] = r.confidence;
    if (shared_hist) {
      atomicAdd(&hist[bin], 1u);
    } else {
      atomicAdd(&counts[bin], 1ull);
    }
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < n_counts; k += blockDim.x) {
      if (hist[k]) atomicAdd(&counts[k], (unsigned long long)hist[k]);
    }
  }
}

template <typename A, typename L>
void launch(const A* acc, const float* wsum, int64_t c, int64_t n, int64_t stride, float threshold,
            int64_t ignore_index, int kind, L* labels, uint8_t* confidence, int64_t* counts,
            cudaStream_t stream) {
  if (n == 0) return;
  const int64_t n_counts = (c == 1 ? 2 : c) + 2;
  const int threads = 256;
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest, which also keeps the
  // number of histogram flushes small.
  const int blocks = std::min(blocks_for(n, threads), 132 * 16);
  finalize_kernel<A, L><<<blocks, threads, 0, stream>>>(
      acc, wsum, c, n, stride, threshold, ignore_index, kind, labels, confidence,
      reinterpret_cast<unsigned long long*>(counts), n_counts);
  check_cuda(cudaGetLastError(), "finalize");
}

template <typename A>
void launch_labels(const A* acc, const float* wsum, int64_t c, int64_t n, int64_t stride,
                   float threshold,
                   int64_t ignore_index, int kind, void* labels, int label_bytes,
                   uint8_t* confidence, int64_t* counts, cudaStream_t stream) {
  if (label_bytes == 2) {
    launch(acc, wsum, c, n, stride, threshold, ignore_index, kind, static_cast<uint16_t*>(labels),
           confidence, counts, stream);
  } else {
    launch(acc, wsum, c, n, stride, threshold, ignore_index, kind, static_cast<uint8_t*>(labels),
           confidence, counts, stream);
  }
}

}  // namespace

void finalize_cuda(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n, int64_t stride,
                   float threshold, int64_t ignore_index, int kind, void* labels,
                   int label_bytes, uint8_t* confidence, int64_t* counts,
                   uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (acc_dtype == kFloat16) {
    launch_labels(static_cast<const __half*>(acc), wsum, c, n, stride, threshold, ignore_index, kind,
                  labels, label_bytes, confidence, counts, stream);
  } else {
    launch_labels(static_cast<const float*>(acc), wsum, c, n, stride, threshold, ignore_index, kind,
                  labels, label_bytes, confidence, counts, stream);
  }
}

}  // namespace atso
