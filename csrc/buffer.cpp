// Buffer parsing, argument checks, output allocation and the CPU/CUDA choice (see buffer.h).
#include "buffer.h"

#include <algorithm>
#include <sstream>

#include "cpu/isa.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace atso {
namespace {

std::string module_of(py::handle obj) {
  const std::string mod = py::str(py::type::handle_of(obj).attr("__module__"));
  return mod.substr(0, mod.find('.'));
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

std::vector<int64_t> int_list(py::handle seq) {
  std::vector<int64_t> out;
  for (py::handle v : seq) out.push_back(py::int_(py::reinterpret_borrow<py::object>(v)).cast<int64_t>());
  return out;
}

// C-contiguous strides (bytes) of shape.
std::vector<int64_t> c_strides(const std::vector<int64_t>& shape, int64_t itemsize) {
  std::vector<int64_t> s(shape.size());
  int64_t step = itemsize;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = step;
    step *= shape[i];
  }
  return s;
}

void read_numpy(Buffer& b) {
  auto arr = py::reinterpret_borrow<py::array>(b.obj);
  const py::dtype dt = arr.dtype();
  b.framework = "numpy";
  b.dtype = dt.attr("isnative").cast<bool>() ? py::str(dt.attr("name")) : py::str(dt);
  b.itemsize = (int)arr.itemsize();
  b.data = const_cast<void*>(arr.data());
  b.writeable = arr.writeable();
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) {
    b.shape.push_back(arr.shape(i));
    b.strides.push_back(arr.strides(i));
  }
}

void read_torch(Buffer& b) {
  const py::object device = b.obj.attr("device");
  const std::string type = py::str(device.attr("type"));
  if (type != "cpu" && type != "cuda") {
    throw py::type_error(b.name + " must be on cpu or cuda, got a tensor on " + std::string(py::str(device)));
  }
  b.framework = "torch";
  b.cuda = type == "cuda";
  b.device = b.cuda ? device.attr("index").cast<int>() : -1;
  b.dtype = py::str(b.obj.attr("dtype"));
  if (b.dtype.rfind("torch.", 0) == 0) b.dtype = b.dtype.substr(6);
  b.itemsize = b.obj.attr("element_size")().cast<int>();
  b.data = reinterpret_cast<void*>(b.obj.attr("data_ptr")().cast<uintptr_t>());
  b.shape = int_list(b.obj.attr("shape"));
  b.strides = int_list(b.obj.attr("stride")());
  for (int64_t& s : b.strides) s *= b.itemsize;
}

// "<f4" -> float32, "|u1" -> uint8, "|b1" -> bool; a byte-swapped type keeps its typestr.
std::string typestr_name(const std::string& t, int* itemsize) {
  *itemsize = std::stoi(t.substr(2));
  if (t[0] == '>' && *itemsize > 1) return t;
  const std::string bits = std::to_string(8 * *itemsize);
  switch (t[1]) {
    case 'f': return "float" + bits;
    case 'i': return "int" + bits;
    case 'u': return "uint" + bits;
    case 'c': return "complex" + bits;
    case 'b': return "bool";
    default: return t;
  }
}

int cai_device(const Buffer& b) {
  if (py::hasattr(b.obj, "device")) {
    const py::object d = b.obj.attr("device");
    if (py::hasattr(d, "id")) return d.attr("id").cast<int>();  // CuPy
    if (py::hasattr(d, "index") && !d.attr("index").is_none()) return d.attr("index").cast<int>();
  }
#ifdef WITH_CUDA
  cudaPointerAttributes attr{};
  if (b.data && cudaPointerGetAttributes(&attr, b.data) == cudaSuccess) return attr.device;
  cudaGetLastError();
#endif
  return -1;
}

void read_cuda_array_interface(Buffer& b) {
  const py::dict cai = b.obj.attr("__cuda_array_interface__");
  b.framework = module_of(b.obj);
  b.cuda = true;
  b.dtype = typestr_name(py::str(cai["typestr"]), &b.itemsize);
  const py::tuple data = cai["data"];
  b.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  b.writeable = !data[1].cast<bool>();
  b.shape = int_list(cai["shape"]);
  const bool has_strides = cai.contains("strides") && !cai["strides"].is_none();
  b.strides = has_strides ? int_list(cai["strides"]) : c_strides(b.shape, b.itemsize);
  if (cai.contains("stream") && !cai["stream"].is_none()) b.cai_stream = cai["stream"].cast<uintptr_t>();
  b.device = cai_device(b);
}

}  // namespace

bool Buffer::contiguous() const {
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return true;
  int64_t step = itemsize;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != step) return false;
    step *= shape[i];
  }
  return true;
}

std::string Buffer::describe() const {
  const std::string where = cuda ? "cuda:" + std::to_string(device) : "cpu";
  return framework + " " + dtype + " array of shape " + shape_str(shape) + " on " + where;
}

Buffer to_buffer(py::handle obj, const char* name) {
  Buffer b;
  b.name = name;
  b.obj = py::reinterpret_borrow<py::object>(obj);
  if (py::isinstance<py::array>(obj)) {
    read_numpy(b);
  } else if (module_of(obj) == "torch" && py::hasattr(obj, "data_ptr")) {
    read_torch(b);
  } else if (py::hasattr(obj, "__cuda_array_interface__")) {
    read_cuda_array_interface(b);
  } else {
    throw py::type_error(b.name + " must be a numpy array, torch tensor or cupy array, got " + type_name(obj));
  }
  return b;
}

py::handle arg(const py::kwargs& kw, const char* name) {
  if (!kw.contains(name)) throw py::type_error(std::string("missing argument ") + name);
  return kw[name];
}

Buffer array_arg(const py::kwargs& kw, const char* name) { return to_buffer(arg(kw, name), name); }

int64_t int_arg(const py::kwargs& kw, const char* name) {
  const py::handle v = arg(kw, name);
  try {
    return py::int_(py::reinterpret_borrow<py::object>(v)).cast<int64_t>();
  } catch (const py::error_already_set&) {
    throw py::type_error(std::string(name) + " must be an integer, got " + std::string(py::repr(v)));
  }
}

double float_arg(const py::kwargs& kw, const char* name) {
  const py::handle v = arg(kw, name);
  try {
    return py::float_(py::reinterpret_borrow<py::object>(v)).cast<double>();
  } catch (const py::error_already_set&) {
    throw py::type_error(std::string(name) + " must be a number, got " + std::string(py::repr(v)));
  }
}

float float32_arg(const py::kwargs& kw, const char* name) { return (float)float_arg(kw, name); }

float unit_interval_arg(const py::kwargs& kw, const char* name) {
  const double v = float_arg(kw, name);
  if (!(0.0 <= v && v <= 1.0)) {
    throw py::value_error(std::string(name) + " must be in [0, 1], got " + std::string(py::str(py::float_(v))));
  }
  return (float)v;
}

Kind kind_arg(const py::kwargs& kw, const char* name) {
  const std::string kind = str_arg(kw, name);
  if (kind != "logits" && kind != "probabilities") {
    throw py::value_error(std::string(name) + " must be 'logits' or 'probabilities', got " +
                          std::string(py::repr(py::str(kind))));
  }
  return kind == "logits" ? kLogits : kProbabilities;
}

std::string str_arg(const py::kwargs& kw, const char* name) {
  const py::handle v = arg(kw, name);
  if (!py::isinstance<py::str>(v)) {
    throw py::type_error(std::string(name) + " must be a string, got " + std::string(py::repr(v)));
  }
  return v.cast<std::string>();
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

void check_dtype(const Buffer& b, std::initializer_list<const char*> dtypes) {
  std::string names;
  for (const char* d : dtypes) {
    if (b.dtype == d) return;
    names += (names.empty() ? "" : " or ") + std::string(d);
  }
  throw py::value_error(b.name + " must have dtype " + names + ", got " + b.describe());
}

void check_ndim(const Buffer& b, int ndim) {
  if (b.ndim() != ndim) {
    throw py::value_error(b.name + " must have " + std::to_string(ndim) + " dimensions, got " + b.describe());
  }
}

void check_contiguous(const Buffer& b) {
  if (!b.contiguous()) {
    throw py::value_error(b.name + " must be C-contiguous (call .contiguous()/np.ascontiguousarray yourself; "
                          "no silent copies), got a strided " + b.describe());
  }
}

void check_array(const Buffer& b, std::initializer_list<const char*> dtypes, int ndim) {
  check_dtype(b, dtypes);
  if (ndim >= 0) check_ndim(b, ndim);
  check_contiguous(b);
}

void check_writeable(const Buffer& b) {
  if (!b.writeable) throw py::value_error(b.name + " must be writeable, got a read-only " + b.describe());
}

void check_shape(const Buffer& b, const std::vector<int64_t>& want, const std::string& why) {
  if (b.shape != want) {
    throw py::value_error(b.name + " must have shape " + shape_str(want) + why + ", got " + b.describe());
  }
}

void check_rule(const Buffer& b, const char* dtype, const ShapeRule& rule) {
  check_array(b, {dtype}, (int)rule.shape.size());
  if (b.shape != rule.shape) {
    throw py::value_error(b.name + " must have " + rule.what + " " + shape_str(rule.shape) + ", got " + b.describe());
  }
}

std::vector<const Buffer*> ArgArrays::after(std::vector<const Buffer*> first) const {
  for (const Buffer& b : buffers_) first.push_back(&b);
  return first;
}

DType float_dtype(const Buffer& b) {
  if (b.dtype == "bfloat16") return kBFloat16;
  return b.dtype == "float16" ? kFloat16 : kFloat32;
}

py::array_t<int64_t> host_origins(py::handle obj, int64_t batch) {
  py::object o = py::reinterpret_borrow<py::object>(obj);
  if (module_of(obj) == "torch" && py::hasattr(obj, "cpu")) {
    o = o.attr("detach")().attr("cpu")().attr("numpy")();
  } else if (py::hasattr(obj, "__cuda_array_interface__") && py::hasattr(obj, "get")) {
    o = o.attr("get")();  // CuPy
  }
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(o);
  if (!arr) throw py::type_error("origins must be (B, 3) integers, got " + type_name(obj));
  std::vector<int64_t> shape(arr.shape(), arr.shape() + arr.ndim());
  if (arr.ndim() != 2 || shape[1] != 3 || (batch >= 0 && shape[0] != batch)) {
    const std::string want = batch >= 0 ? "(" + std::to_string(batch) + ", 3)" : "(B, 3)";
    throw py::value_error("origins must have shape " + want + ", got " + shape_str(shape));
  }
  // The CUDA path packs origins as int32 (ops/stitch_math.h); voxel coordinates fit easily.
  const int64_t* p = arr.data();
  constexpr int64_t kLimit = int64_t(1) << 30;
  for (int64_t i = 0; i < arr.size(); ++i) {
    if (p[i] < -kLimit || p[i] > kLimit) {
      throw py::value_error("origins must lie within +-2**30 voxels, got " + std::to_string(p[i]));
    }
  }
  return arr;
}

py::object empty_like(const Buffer& like, const std::vector<int64_t>& shape, const std::string& dtype) {
  py::tuple dims(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) dims[i] = py::int_(shape[i]);
  if (like.framework == "numpy") return py::array(py::dtype(dtype), shape);
  if (like.framework == "torch") {
    py::module_ torch = py::module_::import("torch");
    return torch.attr("empty")(dims, py::arg("dtype") = torch.attr(dtype.c_str()), py::arg("device") = like.obj.attr("device"));
  }
  if (like.framework == "cupy") {
    py::module_ cupy = py::module_::import("cupy");
    py::object scope = cupy.attr("cuda").attr("Device")(like.device);
    scope.attr("__enter__")();
    py::object out;
    try {
      out = cupy.attr("empty")(dims, py::arg("dtype") = dtype);
    } catch (...) {
      scope.attr("__exit__")(py::none(), py::none(), py::none());
      throw;
    }
    scope.attr("__exit__")(py::none(), py::none(), py::none());
    return out;
  }
  throw py::type_error("cannot allocate a " + dtype + " output like " + like.name + " (a " + like.describe() +
                       "); pass numpy, torch or cupy arrays");
}

bool on_cuda(const std::vector<const Buffer*>& buffers) {
  const Buffer& first = **buffers.begin();
  for (const Buffer* b : buffers) {
    if (b->cuda == first.cuda) continue;
    std::string desc;
    for (const Buffer* d : buffers) desc += (desc.empty() ? "" : ", ") + d->name + ": " + d->describe();
    throw py::value_error("arrays must all be on the host or all on one CUDA device; got " + desc);
  }
  if (!first.cuda) return false;
  for (const Buffer* b : buffers) {
    if (b->device != first.device) {
      throw py::value_error("arrays are on different CUDA devices: " + first.name + " on cuda:" +
                            std::to_string(first.device) + ", " + b->name + " on cuda:" + std::to_string(b->device));
    }
  }
#ifndef WITH_CUDA
  throw std::runtime_error("CUDA arrays were passed but atso_fast._C was built without CUDA (build_info: " +
                           std::string(py::str(build_info())) + "); rebuild with nvcc on PATH");
#endif
  if (cuda_device_count() == 0) {
    throw std::runtime_error("CUDA arrays were passed but no CUDA device is visible to atso_fast._C (build_info: " +
                             std::string(py::str(build_info())) + ")");
  }
  return true;
}

Path choose_path(const std::string& algorithm, const char* blocked_name, const char* thread_name, bool cuda) {
  const bool blocked = algorithm == blocked_name, thread = algorithm == thread_name;
  if (algorithm != "auto" && !blocked && !thread) {
    throw py::value_error("algorithm must be 'auto', '" + std::string(blocked_name) + "' or '" + thread_name +
                          "', got " + std::string(py::repr(py::str(algorithm))));
  }
  if (cuda && blocked) {
    throw py::value_error("algorithm '" + algorithm + "' is the host kernel; CUDA arrays run 'auto' or '" +
                          thread_name + "'");
  }
  if (cuda) return Path::kCuda;
  return thread ? Path::kThread : Path::kBlocked;
}

int cuda_device_count() {
#ifdef WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

uintptr_t current_stream(const Buffer& b) {
  if (b.framework == "torch") {
    py::object stream = py::module_::import("torch").attr("cuda").attr("current_stream")(b.obj.attr("device"));
    return stream.attr("cuda_stream").cast<uintptr_t>();
  }
  return b.cai_stream;  // CuPy's current stream (0, the legacy default stream, if not given)
}

#ifdef WITH_CUDA
CudaDeviceScope::CudaDeviceScope(int device) {
  if (device < 0 || cudaGetDevice(&previous) != cudaSuccess) return;
  if (previous == device) {
    previous = -1;
    return;
  }
  if (cudaSetDevice(device) != cudaSuccess) previous = -1;
}
CudaDeviceScope::~CudaDeviceScope() {
  if (previous >= 0) cudaSetDevice(previous);
}
#else
CudaDeviceScope::CudaDeviceScope(int) {}
CudaDeviceScope::~CudaDeviceScope() {}
#endif

py::dict build_info() {
  py::dict info;
  info["version"] = ATSO_FAST_VERSION;
  info["cpu_isa"] = cpu_isa();
#ifdef WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_architectures"] = ATSO_CUDA_ARCHITECTURES;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_architectures"] = py::none();
#endif
  info["cuda_devices"] = cuda_device_count();
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  return info;
}

}  // namespace atso
