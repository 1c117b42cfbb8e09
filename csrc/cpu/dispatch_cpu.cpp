// Run-time choice between the baseline and the AVX2+FMA builds of the CPU kernels.
#include "cpu/isa.h"
#include "finalize.h"
#include "stitch.h"

#include <atomic>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace atso {
namespace {

bool cpu_has_avx2() {
#if defined(ATSO_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

std::atomic<bool> g_force_generic{false};

bool use_avx2() { return cpu_has_avx2() && !g_force_generic.load(std::memory_order_relaxed); }

thread_local int t_kernel_threads = 0;  // 0: the OpenMP default

}  // namespace

void set_kernel_threads(int n) { t_kernel_threads = n > 0 ? n : 0; }

int kernel_threads() {
#ifdef _OPENMP
  return t_kernel_threads > 0 ? t_kernel_threads : omp_get_max_threads();
#else
  return 1;
#endif
}

const char* cpu_isa() { return use_avx2() ? "avx2" : "generic"; }

bool set_cpu_isa(const char* isa) {
  if (std::strcmp(isa, "generic") == 0) {
    g_force_generic = true;
    return true;
  }
  if (std::strcmp(isa, "auto") == 0 || (std::strcmp(isa, "avx2") == 0 && cpu_has_avx2())) {
    g_force_generic = false;
    return true;
  }
  return false;
}

void extract_patches_cpu(const float* volume, int64_t m, Shape3 vol, const int64_t* origins,
                         int64_t b, Shape3 patch, float pad_value, void* out, int out_dtype) {
#ifdef ATSO_HAVE_AVX2
  if (use_avx2()) {
    return avx2::extract_patches_cpu(volume, m, vol, origins, b, patch, pad_value, out, out_dtype);
  }
#endif
  generic::extract_patches_cpu(volume, m, vol, origins, b, patch, pad_value, out, out_dtype);
}

void accumulate_cpu(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab, int64_t z0,
                    const void* patches, int patch_dtype, const int64_t* origins, int64_t b,
                    Shape3 patch, const float* importance) {
#ifdef ATSO_HAVE_AVX2
  if (use_avx2()) {
    return avx2::accumulate_cpu(acc, acc_dtype, wsum, c, slab, z0, patches, patch_dtype, origins,
                                b, patch, importance);
  }
#endif
  generic::accumulate_cpu(acc, acc_dtype, wsum, c, slab, z0, patches, patch_dtype, origins, b,
                          patch, importance);
}

void finalize_cpu(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n,
                  int64_t stride, float threshold, int64_t ignore_index, int kind, void* labels,
                  int label_bytes, uint8_t* confidence, int64_t* counts) {
#ifdef ATSO_HAVE_AVX2
  if (use_avx2()) {
    return avx2::finalize_cpu(acc, acc_dtype, wsum, c, n, stride, threshold, ignore_index, kind,
                              labels, label_bytes, confidence, counts);
  }
#endif
  generic::finalize_cpu(acc, acc_dtype, wsum, c, n, stride, threshold, ignore_index, kind, labels,
                        label_bytes, confidence, counts);
}

}  // namespace atso
