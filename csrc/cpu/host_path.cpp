// The CUDA kernels' per-thread bodies (ops/stitch_math.h, ops/finalize_math.h) run by host
// loops over the same launch plan: the GPU algorithm, testable on every CI machine. Only the
// thread indexing differs from cuda/*.cu (an OpenMP loop here, a grid-stride loop there), and
// the per-class histogram (per-thread counts here, shared memory and atomics there: integer
// counts, so the same totals). Not tuned for speed; the blocked kernels are the CPU default.
#include <vector>

#include "cpu/isa.h"
#include "ops/finalize_math.h"
#include "ops/stitch_math.h"

namespace atso {
namespace {

template <typename Out>
void extract_host(const ExtractArgs& a) {
  const int64_t win_n = a.patch.z * a.patch.y * a.patch.x;
  for_each_extract_launch(a, [&](int64_t first, int64_t count, const Origins& o) {
    const int64_t total = count * a.m * win_n;
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t i = 0; i < total; ++i) extract_element<Out>(a, o, first, i);
  });
}

template <typename A, typename P>
void accumulate_host_impl(const AccumulateArgs& a) {
  for_each_accumulate_launch(a, [&](int64_t first, int64_t count, const Origins& o, Shape3 lo, Shape3 box) {
    const int64_t total = box.z * box.y * box.x;
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
    for (int64_t i = 0; i < total; ++i) {
      const int64_t x = lo.x + i % box.x, y = lo.y + (i / box.x) % box.y, z = lo.z + i / (box.x * box.y);
      accumulate_voxel<A, P>(a, o, first, (int)count, z, y, x);
    }
  });
}

template <typename A, typename L>
void finalize_host_impl(const FinalizeArgs& f) {
  const int64_t k_classes = f.c == 1 ? 2 : f.c;
  L* labels = static_cast<L*>(f.labels);
#pragma omp parallel num_threads(kernel_threads())
  {
    std::vector<int64_t> local(k_classes + 2, 0);
#pragma omp for schedule(static)
    for (int64_t v = 0; v < f.n; ++v) {
      const Voxel r = finalize_voxel<A>(f, v);
      labels[v] = (L)label_value(f, r.label);
      f.confidence[v] = r.confidence;
      ++local[count_bin(r.label, k_classes)];
    }
#pragma omp critical
    for (int64_t k = 0; k < k_classes + 2; ++k) f.counts[k] += local[k];
  }
}

template <typename A>
void probabilities_host_impl(const ProbabilitiesArgs& p) {
#pragma omp parallel for schedule(static) num_threads(kernel_threads())
  for (int64_t v = 0; v < p.f.n; ++v) probabilities_voxel<A>(p, v);
}

}  // namespace

void extract_patches_host(const ExtractArgs& a) {
  with_float_type(a.out_dtype, [&](auto out) { extract_host<decltype(out)>(a); });
}

void accumulate_host(const AccumulateArgs& a) {
  with_float_type(a.acc_dtype, [&](auto acc) {
    with_patch_type(a.patch_dtype, [&](auto patch) { accumulate_host_impl<decltype(acc), decltype(patch)>(a); });
  });
}

void finalize_host(const FinalizeArgs& f) {
  with_float_type(f.acc_dtype, [&](auto acc) {
    if (f.label_bytes == 2) {
      finalize_host_impl<decltype(acc), uint16_t>(f);
    } else {
      finalize_host_impl<decltype(acc), uint8_t>(f);
    }
  });
}

void probabilities_host(const ProbabilitiesArgs& p) {
  with_float_type(p.f.acc_dtype, [&](auto acc) { probabilities_host_impl<decltype(acc)>(p); });
}

}  // namespace atso
