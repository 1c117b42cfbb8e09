// The Python-facing functions of atso_fast._C, one per kernel (bindings.cpp binds them): each
// parses its arguments into Buffers, checks them, fills the kernel's argument struct and runs
// the CPU or CUDA implementation (buffer.h: run). Arrays are passed as they are (NumPy, torch,
// CuPy); atso_fast/kernels/native.py documents the contracts.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace atso {

// stitch.cpp
py::object extract_patches(py::handle volume, py::handle origins, py::handle patch_size, float pad_value,
                           py::handle out, const std::string& out_dtype, const std::string& algorithm);
void accumulate(py::handle acc, py::handle wsum, py::handle patches, py::handle origins, py::handle importance,
                int64_t z0, const std::string& algorithm);

// finalize.cpp
std::string finalize_label_dtype(int64_t channels, double threshold, int64_t ignore_index, const std::string& kind);
py::tuple finalize(py::handle acc, py::handle wsum, double threshold, int64_t ignore_index, const std::string& kind,
                   py::handle rows, const std::string& algorithm);

}  // namespace atso
