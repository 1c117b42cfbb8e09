// Blocked CPU (OpenMP) finalisation: blended sums -> labels, confidence, per-class counts.
//
// The accumulator is channel-major (C, N). Voxels are processed in blocks of kBlock so that a
// block's C x kBlock values stay in L1/L2 across the passes (max, sum of exponentials), and
// every channel is read as a contiguous run (friendly to prefetchers even at C = 105). The
// operations per voxel, and their order, are those of finalize_voxel (ops/finalize_math.h),
// the CUDA kernel's per-thread body, here vectorised across the voxels of a block.
#include <algorithm>
#include <vector>

#include "cpu/half_row.h"
#include "cpu/isa.h"
#include "ops/finalize_math.h"

namespace atso {
namespace ATSO_ISA {
namespace {

constexpr int64_t kBlock = 256;

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

// Multi-class: argmax (lowest index wins ties) and max probability.
void decide_block(const float* __restrict vals, int64_t c, int64_t nb, Kind kind, int32_t* __restrict best,
                  float* __restrict prob) {
  float maxv[kBlock];
  for (int64_t j = 0; j < nb; ++j) {
    maxv[j] = vals[j];
    best[j] = 0;
  }
  for (int32_t k = 1; k < (int32_t)c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) argmax_step(row[j], k, maxv[j], best[j]);
  }
  if (kind == kProbabilities) {
    for (int64_t j = 0; j < nb; ++j) prob[j] = maxv[j];
    return;
  }
  float sum[kBlock];
  for (int64_t j = 0; j < nb; ++j) sum[j] = 0.0f;
  for (int64_t k = 0; k < c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) sum[j] = add_rn(sum[j], softmax_term(row[j], maxv[j]));
  }
  for (int64_t j = 0; j < nb; ++j) prob[j] = softmax_prob(sum[j]);
}

template <typename A, typename L>
void finalize_block(const FinalizeArgs& f, int64_t start, int64_t nb, int64_t* counts, float* vals,
                    const float* table) {
  uint8_t invalid[kBlock];
  int32_t best[kBlock];
  float prob[kBlock];
  load_block<A>(f, start, nb, vals, invalid, table);
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

}  // namespace

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
