// The blocked CPU kernels are compiled twice, once for baseline x86-64 (SSE2) and once for
// AVX2+FMA+F16C, each into its own namespace (ATSO_ISA = generic | avx2), and cpu_kernels()
// picks one table at run time. Both builds use -ffp-contract=off, so they produce bit-identical
// results. A kernel's arguments travel in its struct (stitch.h, finalize.h), so a new argument
// touches none of this.
#pragma once

#include "finalize.h"
#include "resample.h"
#include "stitch.h"

#ifndef ATSO_ISA
#define ATSO_ISA generic
#endif

namespace atso {

struct CpuKernels {
  void (*extract_patches)(const ExtractArgs&);
  void (*accumulate)(const AccumulateArgs&);
  void (*finalize)(const FinalizeArgs&);
  void (*probabilities)(const ProbabilitiesArgs&);
  void (*resample_finalize)(const ResampleFinalizeArgs&);
};

namespace generic {
extern const CpuKernels kernels;  // cpu/kernels.cpp, baseline build
}
namespace avx2 {
extern const CpuKernels kernels;  // cpu/kernels.cpp, AVX2 build
}

// The table this CPU runs (AVX2 when it has it and set_cpu_isa did not force "generic").
const CpuKernels& cpu_kernels();
const char* cpu_isa();  // "avx2" or "generic": what cpu_kernels() returns now
// "generic" forces the baseline build (tests compare the two); "auto" or "avx2" (when the CPU
// has it) restores the automatic choice. Returns false for an unavailable choice.
bool set_cpu_isa(const char* isa);
// OpenMP threads of the CPU kernels called from this thread: n > 0 fixes it, 0 means the
// OpenMP default (omp_get_max_threads()). Thread-local, so one relabeler's choice does not
// leak into kernels other threads call.
void set_kernel_threads(int n);
int kernel_threads();

}  // namespace atso
