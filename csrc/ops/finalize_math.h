// Per-voxel math of finalize and probabilities, written once for the blocked CPU kernels, the
// CUDA kernels and the host build of the CUDA path: value = acc / wsum, invalid-voxel rules,
// argmax with the lowest index winning ties, a two-pass softmax (max, then the sum of
// exp(value - max)) with one polynomial exp, sigmoid for one channel, threshold -> ignore_index,
// confidence rounding; and each channel's probability from the same max and sum.
// Every step rounds as ops/hd.h says, so float32 results are bit-identical on the CPU (both
// ISA builds) and the GPU.
#pragma once
#include <cstdint>

#include "finalize.h"
#include "ops/half.h"
#include "ops/hd.h"

namespace atso {

// exp(x) for x <= 0 (softmax after subtracting the max, sigmoid of -|v|): Cephes'
// single-precision polynomial with Cody-Waite range reduction, within 2 ulp of expf. Plain
// arithmetic, so the CPU compiler vectorises the softmax loop (a libm call per element would not
// be), and the same operations on the GPU (CUDA's expf differs from glibc's in the last bits).
ATSO_HD inline float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;  // also maps NaN to -87 (NaN voxels are flagged invalid anyway)
  const float t = mul_rn(x, 1.44269504088896341f);
  const int n = (int)sub_rn(t, 0.5f);  // round to nearest for t <= 0
  const float fn = (float)n;
  const float r = add_rn(sub_rn(x, mul_rn(fn, 0.693359375f)), mul_rn(fn, 2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999507e-3f);
  p = add_rn(mul_rn(p, r), 8.3334519073e-3f);
  p = add_rn(mul_rn(p, r), 4.1665795894e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665459e-1f);
  p = add_rn(mul_rn(p, r), 5.0000001201e-1f);
  p = add_rn(add_rn(mul_rn(mul_rn(p, r), r), r), 1.0f);
  return mul_rn(p, bits_to_float((uint32_t)(n + 127) << 23));
}

// The rules below that take the FinalizeArgs struct take it so that an option of a rule reaches
// the blocked CPU kernel, the CUDA kernel and its host build through this one function.

// The blended value of one channel; non-finite (zero weight, inf, NaN) marks the voxel invalid.
ATSO_HD inline float blended(const FinalizeArgs&, float acc, float wsum) { return div_rn(acc, wsum); }
ATSO_HD inline bool invalid_weight(const FinalizeArgs&, float wsum) { return !(wsum > 0.0f) || !finite(wsum); }

// Argmax over channels in index order: a channel wins only when strictly greater, so ties go
// to the lowest index. Written as selects so the CPU loop over voxels vectorises.
ATSO_HD inline void argmax_step(float value, int32_t k, float& max, int32_t& best) {
  const int32_t gt = -(int32_t)(value > max);  // all ones where the channel wins
  best = (best & ~gt) | (k & gt);
  max = gt ? value : max;
}

// Softmax: sum over channels (index order) of exp(value - max); a channel's probability is its
// term / sum. The max channel's term is exp_nonpositive(0) == 1 exactly, so the max probability
// (finalize's threshold and confidence) is 1 / sum, the very value probabilities writes there.
ATSO_HD inline float softmax_term(float value, float max) { return exp_nonpositive(sub_rn(value, max)); }
ATSO_HD inline float softmax_share(float term, float sum) { return div_rn(term, sum); }
ATSO_HD inline float softmax_prob(float sum) { return softmax_share(1.0f, sum); }

// One sigmoid channel is the softmax over (0, v): the term of the less likely class is
// e = exp(-|v|) <= 1 (the same exp serves both signs without overflow), the other's is 1, the
// sum 1 + e.
ATSO_HD inline float sigmoid_term(float v) { return exp_nonpositive(-fabsf(v)); }
ATSO_HD inline float sigmoid_sum(float e) { return add_rn(1.0f, e); }

struct Decision {
  int32_t label;
  float prob;  // probability of label
};

// C == 1: sigmoid (logits) or the probability itself; label 1 only when p > 0.5 (ties -> 0).
// q = 1 / (1 + exp(-|v|)) is the probability of the more likely class.
ATSO_HD inline Decision decide_binary(const FinalizeArgs& f, float v) {
  if (f.kind == kLogits) {
    const float q = softmax_prob(sigmoid_sum(sigmoid_term(v)));
    return {(v > 0.0f && q > 0.5f) ? 1 : 0, q};
  }
  return v > 0.5f ? Decision{1, v} : Decision{0, sub_rn(1.0f, v)};
}

// C == 1: the foreground probability, probabilities' one channel: the sigmoid of the logit
// (where v > 0, decide_binary's q; elsewhere e / (1 + e), not 1 - q, which would cancel small
// probabilities away), or the value itself. So the label is 1 exactly where it exceeds 0.5.
ATSO_HD inline float binary_probability(const FinalizeArgs& f, float v) {
  if (f.kind != kLogits) return v;
  const float e = sigmoid_term(v);
  return softmax_share(v > 0.0f ? 1.0f : e, sigmoid_sum(e));
}

// C >= 2: the probability of a channel with value x, from its voxel's max and softmax sum (logits),
// or the value itself (max and sum unused).
ATSO_HD inline float channel_probability(const FinalizeArgs& f, float x, float max, float sum) {
  return f.kind == kLogits ? softmax_share(softmax_term(x, max), sum) : x;
}

// What probabilities writes for every channel of a voxel finalize counts invalid: one quiet NaN,
// the same bits on every side.
ATSO_HD inline float output_probability(bool invalid, float p) { return invalid ? bits_to_float(0x7fc00000u) : p; }

// round(p * 255) to nearest, clamped to 0..255.
ATSO_HD inline uint8_t to_confidence(float p) {
  const float s = floorf(add_rn(mul_rn(p, 255.0f), 0.5f));
  return (uint8_t)(s < 0.0f ? 0.0f : (s > 255.0f ? 255.0f : s));
}

// Result of one voxel: a class index, or kBelow (max probability under the threshold) or
// kInvalid (zero weight or non-finite values); both of those are written as ignore_index.
constexpr int32_t kBelow = -1, kInvalid = -2;
struct Voxel {
  int32_t label;
  uint8_t confidence;
};

ATSO_HD inline Voxel classify(const FinalizeArgs& f, bool invalid, float prob, int32_t best) {
  if (invalid || !finite(prob)) return {kInvalid, 0};
  return {prob < f.threshold ? kBelow : best, to_confidence(prob)};
}

// counts bin of a voxel result: its class, K for below threshold, K + 1 for invalid.
ATSO_HD inline int64_t count_bin(int32_t label, int64_t k_classes) {
  return label >= 0 ? label : (label == kBelow ? k_classes : k_classes + 1);
}

ATSO_HD inline int64_t label_value(const FinalizeArgs& f, int32_t label) { return label >= 0 ? label : f.ignore_index; }

// Voxel v, on its own: the CUDA kernels' per-thread bodies (and their host build). Pass 1
// (scan_voxel) reads every channel for the max and argmax, pass 2 reads them again for the
// softmax sum, which is the blocked CPU kernels' order of operations for every voxel.

// The blended value of channel k of voxel v, whose weight is w.
template <typename A>
ATSO_HD inline float voxel_value(const FinalizeArgs& f, int64_t k, int64_t v, float w) {
  return blended(f, to_float(load_ro(static_cast<const A*>(f.acc) + k * f.chan_stride + v)), w);
}

struct VoxelScan {
  float w;        // weight sum
  float max;      // largest value (channel 0's for C == 1)
  int32_t best;   // its channel, the lowest on ties
  bool invalid;   // zero or non-finite weight, or a non-finite value
};

template <typename A>
ATSO_HD inline VoxelScan scan_voxel(const FinalizeArgs& f, int64_t v) {
  VoxelScan s;
  s.w = load_ro(f.wsum + v);
  s.max = voxel_value<A>(f, 0, v, s.w);
  s.best = 0;
  s.invalid = invalid_weight(f, s.w) || !finite(s.max);
  for (int64_t k = 1; k < f.c; ++k) {
    const float x = voxel_value<A>(f, k, v, s.w);
    s.invalid = s.invalid || !finite(x);
    argmax_step(x, (int32_t)k, s.max, s.best);
  }
  return s;
}

template <typename A>
ATSO_HD inline float softmax_sum_voxel(const FinalizeArgs& f, int64_t v, const VoxelScan& s) {
  float sum = 0.0f;
  for (int64_t k = 0; k < f.c; ++k) sum = add_rn(sum, softmax_term(voxel_value<A>(f, k, v, s.w), s.max));
  return sum;
}

template <typename A>
ATSO_HD inline Voxel finalize_voxel(const FinalizeArgs& f, int64_t v) {
  const VoxelScan s = scan_voxel<A>(f, v);
  if (f.c == 1) {
    const Decision d = decide_binary(f, s.max);
    return classify(f, s.invalid, d.prob, d.label);
  }
  if (f.kind == kProbabilities) return classify(f, s.invalid, s.max, s.best);
  return classify(f, s.invalid, softmax_prob(softmax_sum_voxel<A>(f, v, s)), s.best);
}

// probabilities of voxel v: out[k * n + v] for every channel k (a third read of the channels).
template <typename A>
ATSO_HD inline void probabilities_voxel(const ProbabilitiesArgs& p, int64_t v) {
  const FinalizeArgs& f = p.f;
  const VoxelScan s = scan_voxel<A>(f, v);
  float* out = p.out + v;
  if (f.c == 1) {
    out[0] = output_probability(s.invalid, binary_probability(f, s.max));
    return;
  }
  const float sum = f.kind == kLogits ? softmax_sum_voxel<A>(f, v, s) : 1.0f;
  for (int64_t k = 0; k < f.c; ++k) {
    out[k * f.n] = output_probability(s.invalid, channel_probability(f, voxel_value<A>(f, k, v, s.w), s.max, sum));
  }
}

}  // namespace atso
