// The Python-facing functions of atso_fast._C, one per kernel (bindings.cpp binds them). Each
// takes its arguments by keyword (so a new argument changes no declaration here), parses them
// into Buffers and scalars, checks them, fills the kernel's argument struct and runs the CPU or
// CUDA implementation (buffer.h: run). Arrays are passed as they are (NumPy, torch, CuPy);
// atso_fast/kernels/native.py documents the contracts.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace atso {

// stitch.cpp: extract_patches(...) -> out; accumulate(...). finalize.cpp: finalize(...) ->
// (labels, confidence, counts); probabilities(...) -> (C, rows, Y, X) float32;
// finalize_label_dtype(channels, threshold, ignore_index, kind) -> "uint8" | "uint16". Their
// keyword arguments: bindings.cpp's docstrings, which list the declared ones from the kernels'
// headers.
py::object extract_patches(const py::kwargs& kw);
void accumulate(const py::kwargs& kw);
py::tuple finalize(const py::kwargs& kw);
py::object probabilities(const py::kwargs& kw);
std::string finalize_label_dtype(const py::kwargs& kw);

// resample.cpp: resample_finalize(rows, y_taps, x_taps, threshold, ignore_index, kind) -> (labels,
// confidence, counts): bilinear resampling of rows (C, R, Yt, Xt) then finalize, in one pass.
py::tuple resample_finalize(const py::kwargs& kw);

}  // namespace atso
