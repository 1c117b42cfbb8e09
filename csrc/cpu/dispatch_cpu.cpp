// Run-time choice between the baseline and the AVX2+FMA builds of the CPU kernels, and the
// per-thread OpenMP thread count.
#include <atomic>
#include <cstring>

#include "cpu/isa.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace atso {
namespace {

bool cpu_has_avx2() {
#if defined(ATSO_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

std::atomic<bool> g_force_generic{false};

bool use_avx2() { return cpu_has_avx2() && !g_force_generic.load(std::memory_order_relaxed); }

thread_local int t_kernel_threads = 0;  // 0: the OpenMP default

}  // namespace

const CpuKernels& cpu_kernels() {
#ifdef ATSO_HAVE_AVX2
  if (use_avx2()) return avx2::kernels;
#endif
  return generic::kernels;
}

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

}  // namespace atso
