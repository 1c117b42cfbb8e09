// CUDA finalisation: one thread per voxel runs finalize_voxel (ops/finalize_math.h, the same
// two-pass softmax and polynomial exp as the CPU kernel; cpu/host_path.cpp runs it on the host
// in CI). Channels are read coalesced (adjacent threads hold adjacent voxels of one channel);
// pass 2 re-reads them, mostly from L2. GPU-only: the grid-stride loop and the per-class
// histogram (shared memory per block, then one atomicAdd per bin), copied back to the host.
// probabilities: one thread per voxel runs probabilities_voxel (the same passes, then each
// channel's probability written coalesced), stream-ordered, no histogram, no copy back.
#include <algorithm>
#include <vector>

#include "cuda/cuda_utils.cuh"
#include "ops/finalize_math.h"

namespace atso {
namespace {

constexpr int kSharedBins = 2048;

template <typename A, typename L>
__global__ void finalize_kernel(FinalizeArgs f, unsigned long long* __restrict__ counts, int64_t n_counts) {
  __shared__ unsigned int hist[kSharedBins];
  const bool shared_hist = n_counts <= kSharedBins;
  if (shared_hist) {
    for (int64_t k = threadIdx.x; k < n_counts; k += blockDim.x) hist[k] = 0;
    __syncthreads();
  }
  L* labels = static_cast<L*>(f.labels);
  ATSO_GRID_STRIDE_LOOP(v, f.n) {
    const Voxel r = finalize_voxel<A>(f, v);
    labels[v] = (L)label_value(f, r.label);
    f.confidence[v] = r.confidence;
    const int64_t bin = count_bin(r.label, n_counts - 2);
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
void launch(const FinalizeArgs& f, unsigned long long* counts, int64_t n_counts, cudaStream_t stream) {
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest, which also keeps the
  // number of histogram flushes small.
  const int blocks = std::min(blocks_for(f.n, kThreads), 132 * 16);
  finalize_kernel<A, L><<<blocks, kThreads, 0, stream>>>(f, counts, n_counts);
  check_cuda(cudaGetLastError(), "finalize");
}

template <typename A>
__global__ void probabilities_kernel(ProbabilitiesArgs p) {
  ATSO_GRID_STRIDE_LOOP(v, p.f.n) { probabilities_voxel<A>(p, v); }
}

}  // namespace

void probabilities_cuda(const ProbabilitiesArgs& p, uintptr_t stream_handle) {
  if (p.f.n == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_float_type(p.f.acc_dtype, [&](auto acc) {
    probabilities_kernel<decltype(acc)><<<blocks_for(p.f.n, kThreads), kThreads, 0, stream>>>(p);
  });
  check_cuda(cudaGetLastError(), "probabilities");
}

void finalize_cuda(const FinalizeArgs& f, uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t n_counts = (f.c == 1 ? 2 : f.c) + 2;
  const size_t bytes = n_counts * sizeof(int64_t);
  void* counts = nullptr;
  check_cuda(cudaMallocAsync(&counts, bytes, stream), "finalize (counts)");
  check_cuda(cudaMemsetAsync(counts, 0, bytes, stream), "finalize (counts)");
  if (f.n > 0) {
    auto* dev_counts = static_cast<unsigned long long*>(counts);
    with_float_type(f.acc_dtype, [&](auto acc) {
      if (f.label_bytes == 2) {
        launch<decltype(acc), uint16_t>(f, dev_counts, n_counts, stream);
      } else {
        launch<decltype(acc), uint8_t>(f, dev_counts, n_counts, stream);
      }
    });
  }
  std::vector<int64_t> host(n_counts);
  check_cuda(cudaMemcpyAsync(host.data(), counts, bytes, cudaMemcpyDeviceToHost, stream), "finalize (counts)");
  check_cuda(cudaFreeAsync(counts, stream), "finalize (counts)");
  check_cuda(cudaStreamSynchronize(stream), "finalize");
  for (int64_t k = 0; k < n_counts; ++k) f.counts[k] += host[k];
}

}  // namespace atso
