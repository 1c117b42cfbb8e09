// pybind11 module atso_fast._C: one m.def per kernel, with its docstring; kernels take their
// arguments by keyword. The functions live
// in stitch.cpp / finalize.cpp (argument checks, CPU or CUDA chosen once), the kernels in
// cpu/ and cuda/, their per-voxel math in ops/. atso_fast/kernels/native.py is the public face.
#include <pybind11/pybind11.h>

#include "buffer.h"
#include "cpu/isa.h"
#include "finalize.h"
#include "python_api.h"
#include "stitch.h"

PYBIND11_MODULE(_C, m) {
  using namespace atso;
  m.doc() = "atso-fast native kernels (CPU OpenMP, optional CUDA). Use atso_fast.native.";
  m.def("build_info", &build_info, "What the module was built with, and the CUDA devices visible now.");
  m.def("set_kernel_threads", &set_kernel_threads, py::arg("n"),
        "OpenMP threads of the CPU kernels called from this Python thread (0: OpenMP default).");
  m.def("kernel_threads", &kernel_threads, "OpenMP threads the CPU kernels use from this thread.");
  m.def("set_cpu_isa", [](const std::string& isa) { return set_cpu_isa(isa.c_str()); }, py::arg("isa"),
        "Force the 'generic' CPU kernels, or back to 'auto'; False if unavailable.");
  // The argument lists name the declared arguments from the kernels' headers, so a new one
  // shows up here by itself.
  m.def("extract_patches", &extract_patches,
        "extract_patches(*, volume, origins, patch_size" ATSO_ARG_NAMES(ATSO_EXTRACT_ARGS) ", out, out_dtype, "
        "algorithm) -> out: window gather into out (B, M, pz, py, px); algorithm 'auto' | 'rows' (host) | "
        "'element' (CUDA's).");
  m.def("accumulate", &accumulate,
        "accumulate(*, acc, wsum, patches, origins" ATSO_ARG_NAMES(ATSO_ACCUMULATE_ARGS) ", algorithm): "
        "gaussian-weighted accumulation into a slab; algorithm 'auto' | 'blocked' (host) | 'gather' (CUDA's).");
  m.def("finalize", &finalize,
        "finalize(*, acc" ATSO_ARG_NAMES(ATSO_FINALIZE_ARGS) ", rows, algorithm) -> (labels, confidence, counts "
        "(K + 2,)); algorithm 'auto' | 'blocked' (host) | 'voxel' (CUDA's).");
  m.def("probabilities", &probabilities,
        "probabilities(*, acc" ATSO_ARG_NAMES(ATSO_PROBABILITIES_ARGS) ", rows, algorithm) -> (C, rows, Y, X) float32: "
        "finalize's per-channel probabilities (softmax, sigmoid for one channel, or the values), NaN where finalize "
        "counts a voxel invalid; algorithm 'auto' | 'blocked' (host) | 'voxel' (CUDA's).");
  m.def("resample_finalize", &resample_finalize,
        "resample_finalize(*, rows, y_taps, x_taps" ATSO_ARG_NAMES(ATSO_FINALIZE_SCALARS) ") -> (labels, confidence, counts "
        "(K + 2,)): rows (C, R, Yt, Xt) float32 resampled bilinearly to (R, Yn, Xn), then finalize; host only.");
  m.def("finalize_label_dtype", &finalize_label_dtype,
        "finalize_label_dtype(*, channels, threshold, ignore_index, kind) -> 'uint8' | 'uint16'; raises "
        "ValueError for a bad threshold, ignore_index or kind.");
}
