// Types shared by every layer of the kernels (binding, CPU, CUDA): dtype codes, output kinds,
// 3-D shapes, and how a kernel declares its arguments.
#pragma once
#include <cstdint>

namespace atso {

// kBFloat16: window patches only (a network's bfloat16 output read as it is, no float32 copy).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Output kind of the network.
enum Kind : int { kLogits = 0, kProbabilities = 1 };

struct Shape3 {
  int64_t z, y, x;
};

}  // namespace atso

// A kernel's declared arguments (the keyword arguments that reach one field of its argument
// struct as they are parsed: scalars, and input arrays whose shape follows from the others) are
// written once, in the kernel's header, as an X-macro list:
//   #define ATSO_<KERNEL>_ARGS(SCALAR, ARRAY)
//     SCALAR(C++ type, name, parser)               e.g. SCALAR(float, threshold, unit_interval_arg)
//     ARRAY(element type, name, dtype, shape rule) e.g. ARRAY(float, importance, "float32", window)
// ATSO_ARG_FIELDS(list) makes them fields of the argument struct (an array as a const element
// pointer); buffer.h's ATSO_DEFINE_READ_ARGS(list) makes the function that fills those fields
// from the Python keywords (parse, check, point); ATSO_ARG_NAMES(list) lists their names for the
// docstrings. The recipe for a new argument: csrc/README.md.
#define ATSO_SCALAR_FIELD(type, name, parser) type name;
#define ATSO_ARRAY_FIELD(type, name, dtype, rule) const type* name;
#define ATSO_ARG_FIELDS(LIST) LIST(ATSO_SCALAR_FIELD, ATSO_ARRAY_FIELD)
#define ATSO_ARG_NAME(type, name, ...) ", " #name
#define ATSO_ARG_NAMES(LIST) LIST(ATSO_ARG_NAME, ATSO_ARG_NAME)
