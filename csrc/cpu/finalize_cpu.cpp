// Blocked CPU (OpenMP) finalisation: blended sums -> labels, confidence, per-class counts
// (finalize), or -> per-channel probabilities (probabilities).
//
// The accumulator is channel-major (C, N). Voxels are processed in blocks of kBlock so that a
// block's C x kBlock values stay in L1/L2 across the passes (max, sum of exponentials), and
// every channel is read as a contiguous run (friendly to prefetchers even at C = 105). The
// operations per voxel, and their order, are those of finalize_voxel (ops/finalize_math.h),
// the CUDA kernel's per-thread body, here vectorised across the voxels of a block.
#include <algorithm>
#include <vector>

#include "cpu/finalize_block.h"
#include "cpu/half_row.h"
#include "cpu/isa.h"
#include "ops/finalize_math.h"

namespace atso {
namespace ATSO_ISA {
namespace {

// Row of the accumulator as float: in place for float32, converted into scratch for float16.
inline const float* float_row(const float* src, int64_t, float*, const float*) { return src; }
inline const float* float_row(const uint16_t* src, int64_t n, float* scratch, const float* table) {
  half_to_float_row(src, n, scratch, table);
  return scratch;
}

// Blended values of one block into vals (C x nb), marking invalid voxels.
template <typename A>
void load_block(const FinalizeArgs& f, int64_t start, int64_t nb, float* vals, uint8_t* invalid,
                const float* table) {
  const float* w = f.wsum + start;
  for (int64_t j = 0; j < nb; ++j) invalid[j] = invalid_weight(f, w[j]);
  for (int64_t k = 0; k < f.c; ++k) {
    float* dst = vals + k * nb;
    const float* src = float_row(static_cast<const A*>(f.acc) + k * f.chan_stride + start, nb, dst, table);
    for (int64_t j = 0; j < nb; ++j) {
      const float v = blended(f, src[j], w[j]);  // dst doubles as scratch: read before written
      dst[j] = v;
      invalid[j] |= !finite(v);
    }
  }
}

template <typename A, typename L>
void finalize_block(const FinalizeArgs& f, int64_t start, int64_t nb, int64_t* counts, float* vals,
                    const float* table) {
  uint8_t invalid[kBlock];
  load_block<A>(f, start, nb, vals, invalid, table);
  decide_and_write<L>(f, start, nb, vals, invalid, counts);
}

template <typename A, typename L>
void finalize_impl(const FinalizeArgs& f) {
  const int64_t n_counts = (f.c == 1 ? 2 : f.c) + 2;
  const int64_t blocks = (f.n + kBlock - 1) / kBlock;
  const float* table = half_table();
#pragma omp parallel num_threads(kernel_threads())
  {
    std::vector<float> vals(f.c * kBlock);
    std::vector<int64_t> local(n_counts, 0);
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t start = bi * kBlock;
      finalize_block<A, L>(f, start, std::min(kBlock, f.n - start), local.data(), vals.data(), table);
    }
#pragma omp critical
    for (int64_t k = 0; k < n_counts; ++k) f.counts[k] += local[k];
  }
}

// Probabilities of voxels [start, start + nb) from their values vals (C x nb) and invalid
// flags: the passes of decide_block, then channel_probability per channel (probabilities_voxel's
// operations, vectorised across the block).
void probabilities_block(const ProbabilitiesArgs& p, int64_t start, int64_t nb, const float* vals,
                         const uint8_t* invalid) {
  const FinalizeArgs& f = p.f;
  if (f.c == 1) {
    float* out = p.out + start;
    for (int64_t j = 0; j < nb; ++j) out[j] = output_probability(invalid[j], binary_probability(f, vals[j]));
    return;
  }
  float maxv[kBlock], sum[kBlock];
  int32_t best[kBlock];
  max_block(vals, f.c, nb, maxv, best);
  if (f.kind == kLogits) {
    softmax_sum_block(vals, f.c, nb, maxv, sum);
  } else {
    for (int64_t j = 0; j < nb; ++j) sum[j] = 1.0f;  // unused by channel_probability
  }
  for (int64_t k = 0; k < f.c; ++k) {
    const float* row = vals + k * nb;
    float* out = p.out + k * f.n + start;
    for (int64_t j = 0; j < nb; ++j) {
      out[j] = output_probability(invalid[j], channel_probability(f, row[j], maxv[j], sum[j]));
    }
  }
}

template <typename A>
void probabilities_impl(const ProbabilitiesArgs& p) {
  const FinalizeArgs& f = p.f;
  const int64_t blocks = (f.n + kBlock - 1) / kBlock;
  const float* table = half_table();
#pragma omp parallel num_threads(kernel_threads())
  {
    std::vector<float> vals(f.c * kBlock);
    uint8_t invalid[kBlock];
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t start = bi * kBlock, nb = std::min(kBlock, f.n - start);
      load_block<A>(f, start, nb, vals.data(), invalid, table);
      probabilities_block(p, start, nb, vals.data(), invalid);
    }
  }
}

}  // namespace

void probabilities_cpu(const ProbabilitiesArgs& p) {
  with_float_type(p.f.acc_dtype, [&](auto acc) { probabilities_impl<decltype(acc)>(p); });
}

void finalize_cpu(const FinalizeArgs& f) {
  with_float_type(f.acc_dtype, [&](auto acc) {
    if (f.label_bytes == 2) {
      finalize_impl<decltype(acc), uint16_t>(f);
    } else {
      finalize_impl<decltype(acc), uint8_t>(f);
    }
  });
}

}  // namespace ATSO_ISA
}  // namespace atso
