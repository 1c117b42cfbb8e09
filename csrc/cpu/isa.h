// The CPU kernels are compiled twice, once for baseline x86-64 (SSE2) and once for AVX2+FMA,
// each into its own namespace (ATSO_ISA = generic | avx2); cpu/dispatch_cpu.cpp picks one at
// run time. Both builds use -ffp-contract=off, so they produce bit-identical results.
#pragma once
#include <cstdint>

#include "common.h"

#ifndef ATSO_ISA
#define ATSO_ISA generic
#endif

#define ATSO_DECLARE_CPU_KERNELS(isa)                                                          \
  namespace isa {                                                                              \
  void extract_patches_cpu(const float* volume, int64_t m, Shape3 vol, const int64_t* origins, \
                           int64_t b, Shape3 patch, float pad_value, void* out, int out_dtype); \
  void accumulate_cpu(void* acc, int acc_dtype, float* wsum, int64_t c, Shape3 slab,           \
                      int64_t z0, const void* patches, int patch_dtype,                        \
                      const int64_t* origins, int64_t b, Shape3 patch,                         \
                      const float* importance);                                                \
  void finalize_cpu(const void* acc, int acc_dtype, const float* wsum, int64_t c, int64_t n,   \
                    int64_t stride, float threshold, int64_t ignore_index, int kind,           \
                    void* labels, int label_bytes, uint8_t* confidence, int64_t* counts);      \
  }

namespace atso {
ATSO_DECLARE_CPU_KERNELS(generic)
ATSO_DECLARE_CPU_KERNELS(avx2)
const char* cpu_isa();  // "avx2" or "generic": what dispatch_cpu.cpp chose on this CPU
// "generic" forces the baseline build (tests compare the two); "auto" or "avx2" (when the CPU
// has it) restores the automatic choice. Returns false for an unavailable choice.
bool set_cpu_isa(const char* isa);
// OpenMP threads of the CPU kernels called from this thread: n > 0 fixes it, 0 means the
// OpenMP default (omp_get_max_threads()). Thread-local, so one relabeler's choice does not
// leak into kernels other threads call.
void set_kernel_threads(int n);
int kernel_threads();
}  // namespace atso
