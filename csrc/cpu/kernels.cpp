// The table of this ISA build's blocked CPU kernels (compiled once per ISA, like the kernels).
#include "cpu/isa.h"

namespace atso {
namespace ATSO_ISA {

void extract_patches_cpu(const ExtractArgs& a);  // cpu/stitch_cpu.cpp
void accumulate_cpu(const AccumulateArgs& a);    // cpu/stitch_cpu.cpp
void finalize_cpu(const FinalizeArgs& a);        // cpu/finalize_cpu.cpp
void probabilities_cpu(const ProbabilitiesArgs& a);  // cpu/finalize_cpu.cpp
void resample_finalize_cpu(const ResampleFinalizeArgs& a);  // cpu/resample_cpu.cpp

const CpuKernels kernels{&extract_patches_cpu, &accumulate_cpu, &finalize_cpu, &probabilities_cpu,
                         &resample_finalize_cpu};

}  // namespace ATSO_ISA
}  // namespace atso
