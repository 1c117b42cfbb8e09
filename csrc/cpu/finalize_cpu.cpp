// CPU (OpenMP) finalisation: blended sums -> labels, confidence, per-class counts.
//
// The accumulator is channel-major (C, N). Voxels are processed in blocks of kBlock so that a
// block's C x kBlock values stay in L1/L2 across the passes (max, sum of exponentials), and
// every channel is read as a contiguous run (friendly to prefetchers even at C = 105).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/half_row.h"
#include "cpu/isa.h"
#include "finalize.h"

namespace atso {
namespace ATSO_ISA {
namespace {

constexpr int64_t kBlock = 256;

// exp(x) for x <= 0 (softmax after subtracting the max), Cephes' single-precision polynomial
// with Cody-Waite range reduction: within 2 ulp of expf, and plain arithmetic, so the
// compiler vectorises the softmax loop (a libm call per element would not be).
inline float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;  // also maps NaN to -87 (NaN voxels are flagged invalid anyway)
  const float t = x * 1.44269504088896341f;
  const int n = (int)(t - 0.5f);  // round to nearest for t <= 0
  const float r = x - (float)n * 0.693359375f + (float)n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline bool finite(float v) { return std::fabs(v) <= FLT_MAX; }  // false for inf and NaN

struct Decision {
  int64_t label;
  float prob;
};

// C == 1: sigmoid (logits) or the probability itself; label 1 only when p > 0.5 (ties -> 0).
inline Decision decide_binary(float v, int kind) {
  const float p = kind == kLogits ? 1.0f / (1.0f + std::exp(-v)) : v;
  return p > 0.5f ? Decision{1, p} : Decision{0, 1.0f - p};
}

// Row of the accumulator as float: in place for float32, converted into scratch for float16.
inline const float* float_row(const float* src, int64_t, float*) { return src; }
inline const float* float_row(const uint16_t* src, int64_t n, float* scratch) {
  half_to_float_row(src, n, scratch);
  return scratch;
}

// Loads acc/wsum for one block into vals (C x nb), marking invalid voxels.
template <typename A>
void load_block(const A* acc, const float* wsum, int64_t c, int64_t stride, int64_t start, int64_t nb,
                float* vals, uint8_t* invalid) {
  const float* w = wsum + start;
  for (int64_t j = 0; j < nb; ++j) invalid[j] = !(w[j] > 0.0f) | !finite(w[j]);
  for (int64_t k = 0; k < c; ++k) {
    float* dst = vals + k * nb;
    const float* src = float_row(acc + k * stride + start, nb, dst);  // dst doubles as scratch
    for (int64_t j = 0; j < nb; ++j) {
      const float v = src[j] / w[j];
      dst[j] = v;
      invalid[j] |= !finite(v);
    }
  }
}

// Multi-class: argmax (lowest index wins ties) and max probability.
void decide_block(const float* __restrict vals, int64_t c, int64_t nb, int kind, int32_t* __restrict best,
                  float* __restrict prob) {
  float maxv[kBlock];
  for (int64_t j = 0; j < nb; ++j) {
    maxv[j] = vals[j];
    best[j] = 0;
  }
  for (int32_t k = 1; k < (int32_t)c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) {
      const float r = row[j], m = maxv[j];
      const int32_t gt = -(int32_t)(r > m);  // all ones where the row wins (strictly)
      best[j] = (best[j] & ~gt) | (k & gt);
      maxv[j] = gt ? r : m;
    }
  }
  if (kind == kProbabilities) {
    for (int64_t j = 0; j < nb; ++j) prob[j] = maxv[j];
    return;
  }
  float sum[kBlock];
  for (int64_t j = 0; j < nb; ++j) sum[j] = 0.0f;
  for (int64_t k = 0; k < c; ++k) {
    const float* row = vals + k * nb;
    for (int64_t j = 0; j < nb; ++j) sum[j] += exp_nonpositive(row[j] - maxv[j]);
  }
  for (int64_t j = 0; j < nb; ++j) prob[j] = 1.0f / sum[j];
}

inline uint8_t to_confidence(float p) {
  const float s = std::floor(p * 255.0f + 0.5f);
  return (uint8_t)(s < 0.0f ? 0.0f : (s > 255.0f ? 255.0f : s));
}

template <typename A, typename L>
void finalize_block(const A* acc, const float* wsum, int64_t c, int64_t stride, int64_t start,
                    int64_t nb, float threshold, int64_t ignore_index, int kind, L* labels,
                    uint8_t* confidence, int64_t* counts, std::vector<float>& vals) {
  uint8_t invalid[kBlock];
  int32_t best[kBlock];
  float prob[kBlock];
  load_block(acc, wsum, c, stride, start, nb, vals.data(), invalid);
  if (c == 1) {
    for (int64_t j = 0; j < nb; ++j) {
      const Decision d = decide_binary(vals[j], kind);
      best[j] = d.label;
      prob[j] = d.prob;
    }
  } else {
    decide_block(vals.data(), c, nb, kind, best, prob);
  }
  const int64_t n_classes = c == 1 ? 2 : c;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t v = start + j;
    if (invalid[j] || !std::isfinite(prob[j])) {
      labels[v] = (L)ignore_index;
      confidence[v] = 0;
      ++counts[n_classes + 1];
      continue;
    }
    confidence[v] = to_confidence(prob[j]);
    if (prob[j] < threshold) {
      labels[v] = (L)ignore_index;
      ++counts[n_classes];
    } else {
      labels[v] = (L)best[j];
      ++counts[best[j]];
    }
  }
}

template <typename A, typename L>
void finalize_impl(const A* acc, const float* wsum, int64_t c, int64_t n, int64_t stride, float threshold,
                   int64_t ignore_index, int kind, L* labels, uint8_t* confidence,
                   int64_t* counts) {
  const int64_t n_counts = (c == 1 ? 2 : c) + 2;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(kernel_threads())
  {
    std::vector<float> vals(c * kBlock);
    std::vector<int64_t> local(n_counts, 0);
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t start = bi * kBlock;
      const int64_t nb = std::min(kBlock, n - start);
      finalize_block(acc, wsum, c, stride, start, nb, threshold, ignore_index, kind, labels,
                     confidence, local.data(), vals);
    }
#pragma omp critical
    for (int64_t k = 0; k < n_counts; ++k) counts[k] += local[k];
  }
}

template <typename A>
void finalize_dispatch_labels(const A* acc, const float* wsum, int64_t c, int64_t n,
                              int64_t stride, float threshold, int64_t ignore_index, int kind, void* labels,
                              int label_bytes, uint8_t* confidence, int64_t* counts) {
  if (label_bytes == 2) {
    finalize_impl(acc, wsum, c, n, stride, threshold, ignore_index, kind, static_cast<uint16_t*>(labels),
                  confidence, counts);
  } else {
    finalize_impl(acc, wsum, c, n, stride, threshold, ignore_index, kind, static_cast<uint8_t*>(labels),
                  confidence, counts);
  }
}

}  // namespace

void finalize_cpu(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n, int64_t stride,
                  float threshold, int64_t ignore_index, int kind, void* labels,
                  int label_bytes, uint8_t* confidence, int64_t* counts) {
  if (acc_dtype == kFloat16) {
    finalize_dispatch_labels(static_cast<const uint16_t*>(acc), wsum, c, n, stride, threshold,
                             ignore_index, kind, labels, label_bytes, confidence, counts);
  } else {
    finalize_dispatch_labels(static_cast<const float*>(acc), wsum, c, n, stride, threshold, ignore_index,
                             kind, labels, label_bytes, confidence, counts);
  }
}

}  // namespace ATSO_ISA
}  // namespace atso
