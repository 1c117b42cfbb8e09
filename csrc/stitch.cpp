// extract_patches and accumulate as atso_fast._C sees them: arguments parsed and checked once,
// the argument struct filled (all pointer arithmetic is here), one implementation run. The
// declared arguments (stitch.h: ATSO_EXTRACT_ARGS, ATSO_ACCUMULATE_ARGS) are read by
// read_args; the arrays that set the kernel's shapes, the outputs and `algorithm`, here.
#include <algorithm>
#include <vector>

#include "buffer.h"
#include "cpu/isa.h"
#include "python_api.h"
#include "stitch.h"

namespace atso {
namespace {

Shape3 patch_shape(py::handle patch_size) {
  std::vector<int64_t> p;
  for (py::handle v : patch_size) p.push_back(py::int_(py::reinterpret_borrow<py::object>(v)).cast<int64_t>());
  if (p.size() != 3 || *std::min_element(p.begin(), p.end()) < 1) {
    throw py::value_error("patch_size must be three positive integers, got " + std::string(py::repr(patch_size)));
  }
  return {p[0], p[1], p[2]};
}

Shape3 shape3(const Buffer& b, int first) { return {b.dim(first), b.dim(first + 1), b.dim(first + 2)}; }

std::vector<int64_t> tail(const std::vector<int64_t>& shape, size_t from) {
  return std::vector<int64_t>(shape.begin() + from, shape.end());
}

// The shape rules the array arguments of ATSO_ACCUMULATE_ARGS name (stitch.h).
struct AccumulateRules {
  ShapeRule window;
};

ATSO_DEFINE_READ_ARGS(ExtractArgs, NoRules, ATSO_EXTRACT_ARGS)
ATSO_DEFINE_READ_ARGS(AccumulateArgs, AccumulateRules, ATSO_ACCUMULATE_ARGS)

}  // namespace

py::object extract_patches(const py::kwargs& kw) {
  const Buffer vol = array_arg(kw, "volume");
  check_array(vol, {"float32"});
  if (vol.ndim() != 3 && vol.ndim() != 4) {
    throw py::value_error("volume must be (Z, Y, X) or (M, Z, Y, X), got " + vol.describe());
  }
  const int lead = vol.ndim() - 3;  // a 3-D volume is one channel
  const Shape3 p = patch_shape(arg(kw, "patch_size"));
  const auto org = host_origins(arg(kw, "origins"), -1);
  ExtractArgs a{};
  ArgArrays arrays;
  read_args(a, kw, NoRules{}, arrays);
  on_cuda(arrays.after({&vol}));  // before out is allocated on the volume's device
  const std::vector<int64_t> shape{org.shape(0), lead ? vol.dim(0) : 1, p.z, p.y, p.x};
  py::object out_obj = py::reinterpret_borrow<py::object>(arg(kw, "out"));
  if (out_obj.is_none()) {
    const std::string out_dtype = str_arg(kw, "out_dtype");
    if (out_dtype != "float32" && out_dtype != "float16") {
      throw py::value_error("out_dtype must be float32 or float16, got " + std::string(py::repr(py::str(out_dtype))));
    }
    out_obj = empty_like(vol, shape, out_dtype);
  }
  const Buffer o = to_buffer(out_obj, "out");
  check_array(o, {"float32", "float16"}, 5);
  check_shape(o, shape);
  check_writeable(o);
  const Path path = choose_path(str_arg(kw, "algorithm"), "rows", "element", on_cuda(arrays.after({&vol, &o})));
  a.volume = vol.as<const float>();
  a.m = shape[1];
  a.vol = shape3(vol, lead);
  a.origins = org.data();
  a.b = shape[0];
  a.patch = p;
  a.out = o.data;
  a.out_dtype = float_dtype(o);
  run(a, path, vol, cpu_kernels().extract_patches, &extract_patches_host, ATSO_CUDA_FN(extract_patches_cuda));
  return out_obj;
}

void accumulate(const py::kwargs& kw) {
  const Buffer ac = array_arg(kw, "acc"), ws = array_arg(kw, "wsum"), pa = array_arg(kw, "patches");
  check_array(ac, {"float32", "float16"}, 4);
  check_array(ws, {"float32"}, 3);
  check_array(pa, {"float32", "float16", "bfloat16"}, 5);
  check_shape(ws, tail(ac.shape, 1), " (acc's spatial shape)");
  if (pa.dim(1) != ac.dim(0) && pa.dim(0) > 0) {
    throw py::value_error("patches must have " + std::to_string(ac.dim(0)) + " channels like acc, got " +
                          pa.describe());
  }
  check_writeable(ac);
  check_writeable(ws);
  AccumulateArgs a{};
  ArgArrays arrays;
  read_args(a, kw, AccumulateRules{{tail(pa.shape, 2), 0, "the window shape"}}, arrays);
  const auto org = host_origins(arg(kw, "origins"), pa.dim(0));
  const Path path = choose_path(str_arg(kw, "algorithm"), "blocked", "gather", on_cuda(arrays.after({&ac, &ws, &pa})));
  a.acc = ac.data;
  a.acc_dtype = float_dtype(ac);
  a.wsum = ws.as<float>();
  a.c = ac.dim(0);
  a.slab = shape3(ac, 1);
  a.patches = pa.data;
  a.patch_dtype = float_dtype(pa);
  a.origins = org.data();
  a.b = pa.dim(0);
  a.patch = shape3(pa, 2);
  if (a.b == 0) return;
  run(a, path, ac, cpu_kernels().accumulate, &accumulate_host, ATSO_CUDA_FN(accumulate_cuda));
}

}  // namespace atso
