// finalize and probabilities as atso_fast._C sees them: arguments parsed and checked once,
// outputs allocated in the input's framework and device, slab rows [start, end) addressed here,
// one implementation run. The declared arguments (finalize.h: ATSO_FINALIZE_ARGS,
// ATSO_PROBABILITIES_ARGS) are read by read_args; acc (which sets the shapes), rows, the
// outputs and `algorithm`, here.
#include "finalize.h"

#include <algorithm>
#include <tuple>
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

// The shape rules the array arguments of ATSO_FINALIZE_ARGS and ATSO_PROBABILITIES_ARGS name
// (finalize.h); a type each, so that each list's read_args is an overload of its own.
struct FinalizeRules {
  ShapeRule slab;
};
struct ProbabilitiesRules {
  ShapeRule slab;
};

ATSO_DEFINE_READ_ARGS(FinalizeArgs, FinalizeRules, ATSO_FINALIZE_ARGS)
ATSO_DEFINE_READ_ARGS(FinalizeArgs, ProbabilitiesRules, ATSO_PROBABILITIES_ARGS)

// acc (C, Zs, Y, X) float32/float16 and the slab rows [r0, r1) both kernels read.
struct Slab {
  Buffer acc;
  std::vector<int64_t> spatial;  // (Zs, Y, X)
  int64_t c, depth, plane, r0, r1;

  ShapeRule rule() const { return {spatial, r0 * plane}; }  // wsum: rows [r0, r1), in place
  std::vector<int64_t> rows_shape() const { return {r1 - r0, spatial[1], spatial[2]}; }
};

Slab read_slab(const py::kwargs& kw) {
  Slab s{array_arg(kw, "acc"), {}, 0, 0, 0, 0, 0};
  check_array(s.acc, {"float32", "float16"}, 4);
  s.spatial.assign(s.acc.shape.begin() + 1, s.acc.shape.end());
  s.c = s.acc.dim(0);
  s.depth = s.acc.dim(1);
  s.plane = s.acc.dim(2) * s.acc.dim(3);
  std::tie(s.r0, s.r1) = row_range(arg(kw, "rows"), s.depth);
  return s;
}

// f's acc fields: rows [r0, r1) of the slab, channel k at chan_stride (the whole slab's rows).
void point_at_rows(FinalizeArgs& f, const Slab& s) {
  if (s.c < 1) throw py::value_error("acc must have at least one channel, got " + s.acc.describe());
  f.acc = s.acc.as<const char>() + s.r0 * s.plane * s.acc.itemsize;
  f.acc_dtype = float_dtype(s.acc);
  f.c = s.c;
  f.n = (s.r1 - s.r0) * s.plane;
  f.chan_stride = s.depth * s.plane;
}

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
  const Slab s = read_slab(kw);
  FinalizeArgs f{};
  ArgArrays arrays;
  read_args(f, kw, FinalizeRules{s.rule()}, arrays);
  point_at_rows(f, s);
  const std::string ldtype = label_dtype(s.c, f.ignore_index);
  const Path path = choose_path(str_arg(kw, "algorithm"), "blocked", "voxel", on_cuda(arrays.after({&s.acc})));
  py::object labels = empty_like(s.acc, s.rows_shape(), ldtype);
  py::object confidence = empty_like(s.acc, s.rows_shape(), "uint8");
  const Buffer lb = to_buffer(labels, "labels"), cf = to_buffer(confidence, "confidence");
  py::array_t<int64_t> counts(std::max<int64_t>(s.c, 2) + 2);
  std::fill(counts.mutable_data(), counts.mutable_data() + counts.size(), 0);
  f.labels = lb.data;
  f.label_bytes = lb.itemsize;
  f.confidence = cf.as<uint8_t>();
  f.counts = counts.mutable_data();
  run(f, path, s.acc, cpu_kernels().finalize, &finalize_host, ATSO_CUDA_FN(finalize_cuda));
  return py::make_tuple(labels, confidence, counts);
}

py::object probabilities(const py::kwargs& kw) {
  const Slab s = read_slab(kw);
  ProbabilitiesArgs p{};
  ArgArrays arrays;
  read_args(p.f, kw, ProbabilitiesRules{s.rule()}, arrays);
  point_at_rows(p.f, s);
  const Path path = choose_path(str_arg(kw, "algorithm"), "blocked", "voxel", on_cuda(arrays.after({&s.acc})));
  std::vector<int64_t> shape = s.rows_shape();
  shape.insert(shape.begin(), s.c);
  py::object out = empty_like(s.acc, shape, "float32");
  p.out = to_buffer(out, "out").as<float>();
  run(p, path, s.acc, cpu_kernels().probabilities, &probabilities_host, ATSO_CUDA_FN(probabilities_cuda));
  return out;
}

}  // namespace atso
