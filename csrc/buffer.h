// The binding layer's view of one array argument, whatever its framework, and the argument
// checks (the only ones: atso_fast/kernels/native.py passes arrays through untouched).
//
// A Buffer is read from a NumPy array (buffer protocol), a torch tensor (data_ptr, stride,
// device) or any object with __cuda_array_interface__ (CuPy, Numba), so no pointer ever passes
// through Python. The check_* helpers raise ValueError/TypeError naming the argument and
// showing its framework, dtype, shape and device. Path and run() are the single point where
// each kernel picks the CPU or CUDA implementation.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <deque>
#include <initializer_list>
#include <string>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace atso {

struct Buffer {
  std::string name;       // argument name, for messages
  std::string framework;  // "numpy", "torch", "cupy", ... (the type's top-level module)
  std::string dtype;      // numpy-style name: "float32", "uint8", ...
  int itemsize = 0;
  void* data = nullptr;
  bool writeable = true;
  std::vector<int64_t> shape, strides;  // strides in bytes
  bool cuda = false;
  int device = -1;            // CUDA device index
  uintptr_t cai_stream = 0;   // __cuda_array_interface__ v3 "stream" (0: none given)
  py::object obj;             // the array itself

  int ndim() const { return (int)shape.size(); }
  int64_t dim(int i) const { return shape[i]; }
  bool contiguous() const;
  std::string describe() const;  // "numpy float64 array of shape (1, 4, 4, 4) on cpu"
  template <typename T>
  T* as() const { return static_cast<T*>(data); }
};

// Raises TypeError for an object that is not an array of a known kind.
Buffer to_buffer(py::handle obj, const char* name);

// Keyword arguments of the Python-facing functions (python_api.h), converted like Python's
// int(), float() and str() would, with a TypeError naming the argument otherwise.
// The scalar parsers are also the `parser` of a declared argument (common.h): they check, too.
py::handle arg(const py::kwargs& kw, const char* name);
Buffer array_arg(const py::kwargs& kw, const char* name);
int64_t int_arg(const py::kwargs& kw, const char* name);
double float_arg(const py::kwargs& kw, const char* name);
float float32_arg(const py::kwargs& kw, const char* name);        // float_arg rounded to float32
float unit_interval_arg(const py::kwargs& kw, const char* name);  // a number in [0, 1]
Kind kind_arg(const py::kwargs& kw, const char* name);            // "logits" | "probabilities"
std::string str_arg(const py::kwargs& kw, const char* name);

std::string shape_str(const std::vector<int64_t>& shape);  // Python's tuple repr

// dtype, then number of dimensions (ndim >= 0), then C-contiguity, as one check.
void check_array(const Buffer& b, std::initializer_list<const char*> dtypes, int ndim = -1);
void check_dtype(const Buffer& b, std::initializer_list<const char*> dtypes);
void check_ndim(const Buffer& b, int ndim);
void check_contiguous(const Buffer& b);
void check_writeable(const Buffer& b);
// "wsum must have shape (4, 4, 4) (acc's spatial shape), got ..." with why = " (acc's spatial shape)".
void check_shape(const Buffer& b, const std::vector<int64_t>& want, const std::string& why = "");
DType float_dtype(const Buffer& b);  // after check_dtype(b, {"float32", "float16"[, "bfloat16"]})

// Shape an array argument must have, where its data starts (in elements), and how the message
// names the shape: "importance must have the window shape (2, 2, 2), got ...".
struct ShapeRule {
  std::vector<int64_t> shape;
  int64_t offset = 0;
  std::string what = "shape";
};
void check_rule(const Buffer& b, const char* dtype, const ShapeRule& rule);  // dtype, ndim, contiguity, shape

// The array arguments a read_args() call read, kept for the device check.
class ArgArrays {
 public:
  template <typename T>
  const T* read(const py::kwargs& kw, const char* name, const char* dtype, const ShapeRule& rule) {
    const Buffer& b = buffers_.emplace_back(array_arg(kw, name));
    check_rule(b, dtype, rule);
    return b.as<const T>() + rule.offset;
  }
  // `first`, then the arrays read here: what on_cuda() checks.
  std::vector<const Buffer*> after(std::vector<const Buffer*> first) const;

 private:
  std::deque<Buffer> buffers_;  // a deque: references stay valid as it grows
};

// Defines read_args(args, kw, rules, arrays) for a declared-argument LIST (common.h): for
// SCALAR(type, name, parser), args.name = parser(kw, "name"); for ARRAY(type, name, dtype,
// rule), args.name = kw["name"] checked against dtype and rules.rule (a ShapeRule member of
// the kernel's Rules struct), pointing rules.rule.offset elements in. In LIST order.
#define ATSO_READ_SCALAR(type, name, parser) args.name = parser(kw, #name);
#define ATSO_READ_ARRAY(type, name, dtype, rule) args.name = arrays.read<type>(kw, #name, dtype, rules.rule);
#define ATSO_DEFINE_READ_ARGS(Args, Rules, LIST)                                               \
  inline void read_args(Args& args, const py::kwargs& kw, [[maybe_unused]] const Rules& rules, \
                        [[maybe_unused]] ArgArrays& arrays) {                                   \
    LIST(ATSO_READ_SCALAR, ATSO_READ_ARRAY)                                                     \
  }
struct NoRules {};  // the Rules of a kernel without declared array arguments

// (B, 3) window origins as host int64, read from a list, NumPy array, torch tensor or CuPy
// array (CUDA ones are copied to the host: a few integers). batch < 0: any B.
py::array_t<int64_t> host_origins(py::handle obj, int64_t batch);

// New array of the framework and device of `like`.
py::object empty_like(const Buffer& like, const std::vector<int64_t>& shape, const std::string& dtype);

// Where a kernel runs: the blocked CPU kernel, the CUDA per-thread algorithm on the host, or CUDA.
enum class Path { kBlocked, kThread, kCuda };

// True when every buffer is on one CUDA device, false when all are on the host; raises
// ValueError for a mix, RuntimeError for CUDA arrays on a build without CUDA.
bool on_cuda(const std::vector<const Buffer*>& buffers);

// algorithm "auto" | blocked_name | thread_name; the blocked kernels run on host arrays only.
Path choose_path(const std::string& algorithm, const char* blocked_name, const char* thread_name, bool cuda);

int cuda_device_count();  // 0 without CUDA support or driver
py::dict build_info();

#ifdef WITH_CUDA
#define ATSO_CUDA_FN(f) (&f)
#else
#define ATSO_CUDA_FN(f) nullptr
#endif

// The CUDA implementation of a kernel (nullptr in a CPU-only build, where on_cuda() has
// already refused CUDA arrays); not a deduced parameter of run(), so nullptr binds to it.
template <typename Args>
struct CudaFn {
  using type = void (*)(const Args&, uintptr_t);
};

// Runs one implementation of a kernel with the GIL released; CUDA runs on the device of
// `first` with the caller's current stream of its framework.
template <typename Args>
void run(const Args& args, Path path, const Buffer& first, void (*blocked)(const Args&),
         void (*host)(const Args&), typename CudaFn<Args>::type cuda);

// ---------------------------------------------------------------- implementation of run
uintptr_t current_stream(const Buffer& b);
struct CudaDeviceScope {  // makes `device` current for the scope (no-op without CUDA)
  explicit CudaDeviceScope(int device);
  ~CudaDeviceScope();
  int previous = -1;
};

template <typename Args>
void run(const Args& args, Path path, const Buffer& first, void (*blocked)(const Args&),
         void (*host)(const Args&), typename CudaFn<Args>::type cuda) {
  if (path == Path::kCuda) {
    const uintptr_t stream = current_stream(first);
    CudaDeviceScope scope(first.device);
    py::gil_scoped_release release;
    cuda(args, stream);
    return;
  }
  py::gil_scoped_release release;
  (path == Path::kBlocked ? blocked : host)(args);
}

}  // namespace atso
