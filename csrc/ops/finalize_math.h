// Per-voxel math of finalize, written once for the blocked CPU kernel, the CUDA kernel and the
// host build of the CUDA path: value = acc / wsum, invalid-voxel rules, argmax with the lowest
// index winning ties, a two-pass softmax (max, then the sum of exp(value - max)) with one
// polynomial exp, sigmoid for one channel, threshold -> ignore_index, confidence rounding.
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

// Softmax: sum over channels (index order) of exp(value - max), then max probability 1 / sum.
ATSO_HD inline float softmax_term(float value, float max) { return exp_nonpositive(sub_rn(value, max)); }
ATSO_HD inline float softmax_prob(float sum) { return div_rn(1.0f, sum); }

struct Decision {
  int32_t label;
  float prob;  // probability of label
};

// C == 1: sigmoid (logits) or the probability itself; label 1 only when p > 0.5 (ties -> 0).
// The sigmoid goes through exp(-|v|) <= 1: q = 1 / (1 + exp(-|v|)) is the probability of the
// more likely class, and the same exp serves both signs without overflow.
ATSO_HD inline Decision decide_binary(const FinalizeArgs& f, float v) {
  if (f.kind == kLogits) {
    const float q = div_rn(1.0f, add_rn(1.0f, exp_nonpositive(-fabsf(v))));
    return {(v > 0.0f && q > 0.5f) ? 1 : 0, q};
  }
  return v > 0.5f ? Decision{1, v} : Decision{0, sub_rn(1.0f, v)};
}

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

// Voxel v, on its own: the CUDA kernel's per-thread body (and its host build). Pass 1 reads
// every channel for the max and argmax, pass 2 reads them again for the softmax sum, which is
// the blocked CPU kernel's order of operations for every voxel.
template <typename A>
ATSO_HD inline Voxel finalize_voxel(const FinalizeArgs& f, int64_t v) {
  const A* acc = static_cast<const A*>(f.acc);
  const float w = load_ro(f.wsum + v);
  float max = blended(f, to_float(load_ro(acc + v)), w);
  bool invalid = invalid_weight(f, w) || !finite(max);
  if (f.c == 1) {
    const Decision d = decide_binary(f, max);
    return classify(f, invalid, d.prob, d.label);
  }
  int32_t best = 0;
  for (int64_t k = 1; k < f.c; ++k) {
    const float x = blended(f, to_float(load_ro(acc + k * f.chan_stride + v)), w);
    invalid = invalid || !finite(x);
    argmax_step(x, (int32_t)k, max, best);
  }
  if (f.kind == kProbabilities) return classify(f, invalid, max, best);
  float sum = 0.0f;
  for (int64_t k = 0; k < f.c; ++k) {
    sum = add_rn(sum, softmax_term(blended(f, to_float(load_ro(acc + k * f.chan_stride + v)), w), max));
  }
  return classify(f, invalid, softmax_prob(sum), best);
}

}  // namespace atso
