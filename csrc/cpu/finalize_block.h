// The decision half of the blocked CPU finalisation, shared by finalize (cpu/finalize_cpu.cpp)
// and resample_finalize (cpu/resample_cpu.cpp): a block of nb voxels' values, channel-major
// (C x nb), to labels, confidence and per-class counts, with ops/finalize_math.h's operations
// in its order for every voxel, vectorised across the block. Its two passes (max_block,
// softmax_sum_block) also give probabilities its max and sum.
#pragma once
#include <cstdint>

#include "cpu/isa.h"
#include "ops/finalize_math.h"

namespace atso {
namespace ATSO_ISA {

constexpr int64_t kBlock = 256;

// Multi-class pass 1 over a block: max and argmax (lowest index wins ties) of every voxel.
inline void max_block(const float* __restrict vals, int64_t c, int64_t nb, float* __restrict maxv,
                      int32_t* __restrict best) {
  for (int64_t j = 0; j < nb; ++j) {
    maxv[j] = vals[j];
    best[j] = 0;
  }
  for (int32_t k = 1; k < (int32_t)c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) argmax_step(row[j], k, maxv[j], best[j]);
  }
}

// Pass 2: the softmax sum of every voxel, channels in index order.
inline void softmax_sum_block(const float* __restrict vals, int64_t c, int64_t nb, const float* __restrict maxv,
                              float* __restrict sum) {
  for (int64_t j = 0; j < nb; ++j) sum[j] = 0.0f;
  for (int64_t k = 0; k < c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) sum[j] = add_rn(sum[j], softmax_term(row[j], maxv[j]));
  }
}

// Multi-class: argmax (lowest index wins ties) and max probability.
inline void decide_block(const float* __restrict vals, int64_t c, int64_t nb, Kind kind, int32_t* __restrict best,
                         float* __restrict prob) {
  float maxv[kBlock];
  max_block(vals, c, nb, maxv, best);
  if (kind == kProbabilities) {
    for (int64_t j = 0; j < nb; ++j) prob[j] = maxv[j];
    return;
  }
  float sum[kBlock];
  softmax_sum_block(vals, c, nb, maxv, sum);
  for (int64_t j = 0; j < nb; ++j) prob[j] = softmax_prob(sum[j]);
}

// Voxels [start, start + nb) of the output from their values vals (C x nb) and invalid flags.
template <typename L>
inline void decide_and_write(const FinalizeArgs& f, int64_t start, int64_t nb, const float* vals,
                             const uint8_t* invalid, int64_t* counts) {
  int32_t best[kBlock];
  float prob[kBlock];
  if (f.c == 1) {
    for (int64_t j = 0; j < nb; ++j) {
      const Decision d = decide_binary(f, vals[j]);
      best[j] = d.label;
      prob[j] = d.prob;
    }
  } else {
    decide_block(vals, f.c, nb, f.kind, best, prob);
  }
  const int64_t k_classes = f.c == 1 ? 2 : f.c;
  L* labels = static_cast<L*>(f.labels);
  for (int64_t j = 0; j < nb; ++j) {
    const Voxel r = classify(f, invalid[j], prob[j], best[j]);
    labels[start + j] = (L)label_value(f, r.label);
    f.confidence[start + j] = r.confidence;
    ++counts[count_bin(r.label, k_classes)];
  }
}

}  // namespace ATSO_ISA
}  // namespace atso
