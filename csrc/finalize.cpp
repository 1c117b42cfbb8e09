// finalize as atso_fast._C sees it: arguments parsed and checked once, outputs allocated in the
// input's framework and device, slab rows [start, end) addressed here, one implementation run.
// The declared arguments (finalize.h: ATSO_FINALIZE_ARGS) are read by read_args; acc (which
// sets the shapes), rows, the outputs and `algorithm`, here.
#include "finalize.h"

#include <algorithm>
#include <vector>

#include "buffer.h"
#include "cpu/isa.h"
#include "python_api.h"

namespace atso {
namespace {

std::pair<int64_t, int64_t> row_range(py::handle rows, int64_t depth) {
  if (rows.is_none()) return {0, depth};
  std::vector<int64_t> r;
  for (py::handle v : rows) r.push_back(py::int_(py::reinterpret_borrow<py::object>(v)).cast<int64_t>());
  if (r.size() != 2 || !(0 <= r[0] && r[0] <= r[1] && r[1] <= depth)) {
    throw py::value_error("rows must satisfy 0 <= start <= end <= " + std::to_string(depth) + ", got " +
                          std::string(py::repr(rows)));
  }
  return {r[0], r[1]};
}

// The shape rules the array arguments of ATSO_FINALIZE_ARGS name (finalize.h).
struct FinalizeRules {
  ShapeRule slab;
};

ATSO_DEFINE_READ_ARGS(FinalizeArgs, FinalizeRules, ATSO_FINALIZE_ARGS)

}  // namespace

std::string label_dtype(int64_t channels, int64_t ignore_index) {
  const int64_t k = std::max<int64_t>(channels, 2);
  if (!(k <= ignore_index && ignore_index <= 65535)) {
    throw py::value_error("ignore_index must be in [" + std::to_string(k) + ", 65535] (not a class label), got " +
                          std::to_string(ignore_index));
  }
  return std::max(k - 1, ignore_index) <= 255 ? "uint8" : "uint16";
}

std::string finalize_label_dtype(const py::kwargs& kw) {
  const int64_t channels = int_arg(kw, "channels");
  unit_interval_arg(kw, "threshold");
  const int64_t ignore_index = int_arg(kw, "ignore_index");
  kind_arg(kw, "kind");
  return label_dtype(channels, ignore_index);
}

py::tuple finalize(const py::kwargs& kw) {
  const Buffer ac = array_arg(kw, "acc");
  check_array(ac, {"float32", "float16"}, 4);
  const std::vector<int64_t> spatial(ac.shape.begin() + 1, ac.shape.end());
  const int64_t c = ac.dim(0), depth = ac.dim(1), plane = ac.dim(2) * ac.dim(3);
  const auto [r0, r1] = row_range(arg(kw, "rows"), depth);
  FinalizeArgs f{};
  ArgArrays arrays;
  read_args(f, kw, FinalizeRules{{spatial, r0 * plane}}, arrays);  // slab rows [r0, r1), in place
  if (c < 1) throw py::value_error("acc must have at least one channel, got " + ac.describe());
  const std::string ldtype = label_dtype(c, f.ignore_index);
  const Path path = choose_path(str_arg(kw, "algorithm"), "blocked", "voxel", on_cuda(arrays.after({&ac})));
  const std::vector<int64_t> out_shape{r1 - r0, spatial[1], spatial[2]};
  py::object labels = empty_like(ac, out_shape, ldtype), confidence = empty_like(ac, out_shape, "uint8");
  const Buffer lb = to_buffer(labels, "labels"), cf = to_buffer(confidence, "confidence");
  py::array_t<int64_t> counts(std::max<int64_t>(c, 2) + 2);
  std::fill(counts.mutable_data(), counts.mutable_data() + counts.size(), 0);
  f.acc = ac.as<const char>() + r0 * plane * ac.itemsize;
  f.acc_dtype = float_dtype(ac);
  f.c = c;
  f.n = (r1 - r0) * plane;
  f.chan_stride = depth * plane;
  f.labels = lb.data;
  f.label_bytes = lb.itemsize;
  f.confidence = cf.as<uint8_t>();
  f.counts = counts.mutable_data();
  run(f, path, ac, cpu_kernels().finalize, &finalize_host, ATSO_CUDA_FN(finalize_cuda));
  return py::make_tuple(labels, confidence, counts);
}

}  // namespace atso
