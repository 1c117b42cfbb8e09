// resample_finalize as atso_fast._C sees it: rows and taps parsed and checked once (taps index
// their input: every index is checked against the input's extent), finalize's declared scalars
// read by read_args (ATSO_FINALIZE_SCALARS), outputs allocated, the blocked CPU kernel run. Host arrays only: on CUDA the resample-back stage keeps torch's
// bilinear and the CUDA finalize (atso_fast/engine/resample.py).
#include "resample.h"

#include <algorithm>
#include <string>
#include <vector>

#include "buffer.h"
#include "cpu/isa.h"
#include "python_api.h"

namespace atso {
namespace {

// Four host arrays (i0, i1 int64; w0, w1 float32) of one axis, n_out long, indices in [0, n_in).
// The Buffers keep the arrays referenced while the kernel runs.
Taps parse_taps(py::handle obj, const char* name, int64_t n_in, std::vector<Buffer>& keep) {
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  if (!py::isinstance<py::sequence>(obj) || py::len(seq) != 4) {
    throw py::type_error(std::string(name) + " must be a tuple (i0, i1, w0, w1), got " + std::string(py::repr(obj)));
  }
  const char* parts[4] = {"[0] (i0)", "[1] (i1)", "[2] (w0)", "[3] (w1)"};
  Buffer b[4];
  for (int k = 0; k < 4; ++k) {
    b[k] = to_buffer(seq[k], (std::string(name) + parts[k]).c_str());
    if (on_cuda({&b[k]})) throw py::value_error(b[k].name + " must be a host array, got " + b[k].describe());
    check_array(b[k], {k < 2 ? "int64" : "float32"}, 1);
    if (k) check_shape(b[k], b[0].shape, std::string(" (as ") + name + "[0])");
  }
  const int64_t n_out = b[0].dim(0);
  if (n_out < 1) throw py::value_error(std::string(name) + " must map to at least one output, got " + b[0].describe());
  for (int k = 0; k < 2; ++k) {
    const int64_t* p = b[k].as<const int64_t>();
    const auto [lo, hi] = std::minmax_element(p, p + n_out);
    if (*lo < 0 || *hi >= n_in) {
      throw py::value_error(b[k].name + " must index [0, " + std::to_string(n_in) + "), got values in [" +
                            std::to_string(*lo) + ", " + std::to_string(*hi) + "]");
    }
  }
  for (auto& x : b) keep.push_back(x);
  return Taps{b[0].as<const int64_t>(), b[1].as<const int64_t>(), b[2].as<const float>(), b[3].as<const float>(),
              n_in, n_out};
}

// finalize's declared scalars (finalize.h), read and checked as finalize reads them.
ATSO_DEFINE_READ_ARGS(FinalizeArgs, NoRules, ATSO_FINALIZE_SCALARS)

}  // namespace

py::tuple resample_finalize(const py::kwargs& kw) {
  const Buffer rows = array_arg(kw, "rows");
  if (on_cuda({&rows})) {
    throw py::value_error("resample_finalize runs on host arrays only, got rows " + rows.describe());
  }
  check_array(rows, {"float32"}, 4);
  const int64_t c = rows.dim(0);
  if (c < 1 || rows.dim(1) < 1 || rows.dim(2) < 1 || rows.dim(3) < 1) {
    throw py::value_error("rows must be a non-empty (C, R, Yt, Xt) array, got " + rows.describe());
  }
  ResampleFinalizeArgs a{};
  FinalizeArgs& f = a.out;
  ArgArrays none;
  read_args(f, kw, NoRules{}, none);
  const std::string ldtype = label_dtype(c, f.ignore_index);
  std::vector<Buffer> keep;
  a.rows = rows.as<const float>();
  a.r = rows.dim(1);
  a.y = parse_taps(arg(kw, "y_taps"), "y_taps", rows.dim(2), keep);
  a.x = parse_taps(arg(kw, "x_taps"), "x_taps", rows.dim(3), keep);
  const std::vector<int64_t> out_shape{a.r, a.y.n_out, a.x.n_out};
  py::object labels = empty_like(rows, out_shape, ldtype), confidence = empty_like(rows, out_shape, "uint8");
  const Buffer lb = to_buffer(labels, "labels"), cf = to_buffer(confidence, "confidence");
  py::array_t<int64_t> counts(std::max<int64_t>(c, 2) + 2);
  std::fill(counts.mutable_data(), counts.mutable_data() + counts.size(), 0);
  f.c = c;
  f.n = a.r * a.y.n_out * a.x.n_out;
  f.labels = lb.data;
  f.label_bytes = lb.itemsize;
  f.confidence = cf.as<uint8_t>();
  f.counts = counts.mutable_data();
  {
    py::gil_scoped_release release;
    cpu_kernels().resample_finalize(a);
  }
  return py::make_tuple(labels, confidence, counts);
}

}  // namespace atso
