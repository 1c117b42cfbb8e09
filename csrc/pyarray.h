// NumPy buffer access for the CPU bindings. The Python layer (atso_fast.native) validates
// arguments with messages naming them; these checks only keep direct _C calls from crashing.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;

namespace atso {

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

inline void check_c_contiguous(const py::array& a, const char* name) {
  require((a.flags() & py::array::c_style) != 0, std::string(name) + " must be C-contiguous");
}

// float32 -> kFloat32, float16 -> kFloat16, anything else raises.
inline int float_code(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  require(kind == 'f' && (a.itemsize() == 4 || a.itemsize() == 2),
          std::string(name) + " must be float32 or float16");
  return a.itemsize() == 4 ? kFloat32 : kFloat16;
}

inline void check_dtype(const py::array& a, char kind, int itemsize, const char* name) {
  require(a.dtype().kind() == kind && a.itemsize() == itemsize,
          std::string(name) + " has the wrong dtype");
}

inline Shape3 shape3(const py::array& a, int first) {
  return {a.shape(first), a.shape(first + 1), a.shape(first + 2)};
}

inline void check_origins(const py::array& origins, int64_t b) {
  check_dtype(origins, 'i', 8, "origins");
  check_c_contiguous(origins, "origins");
  require(origins.ndim() == 2 && origins.shape(0) == b && origins.shape(1) == 3,
          "origins must have shape (B, 3)");
}

}  // namespace atso
