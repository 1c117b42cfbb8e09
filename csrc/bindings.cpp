// pybind11 module atso_fast._C. Thin wrappers only: argument checks live in
// atso_fast/native.py, kernels in cpu/ and cuda/. The GIL is released around every kernel so
// reader/writer threads keep running while a kernel works.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "cpu/isa.h"
#include "finalize.h"
#include "pyarray.h"
#include "stitch.h"

using namespace atso;

namespace {

void extract_patches(const py::array& volume, const py::array& origins, py::array& out,
                     float pad_value) {
  check_dtype(volume, 'f', 4, "volume");
  check_c_contiguous(volume, "volume");
  check_c_contiguous(out, "out");
  require(volume.ndim() == 4 && out.ndim() == 5, "volume must be 4-D and out 5-D");
  check_origins(origins, out.shape(0));
  const int out_code = float_code(out, "out");
  py::gil_scoped_release release;
  extract_patches_cpu(static_cast<const float*>(volume.data()), volume.shape(0), shape3(volume, 1),
                      static_cast<const int64_t*>(origins.data()), out.shape(0), shape3(out, 2),
                      pad_value, out.mutable_data(), out_code);
}

void accumulate(py::array& acc, py::array& wsum, const py::array& patches,
                const py::array& origins, const py::array& importance, int64_t z0) {
  for (const py::array* a : std::initializer_list<const py::array*>{&acc, &wsum, &patches, &importance}) check_c_contiguous(*a, "array");
  require(acc.ndim() == 4 && wsum.ndim() == 3 && patches.ndim() == 5 && importance.ndim() == 3,
          "accumulate: wrong number of dimensions");
  check_dtype(wsum, 'f', 4, "wsum");
  check_dtype(importance, 'f', 4, "importance");
  check_origins(origins, patches.shape(0));
  const int acc_code = float_code(acc, "acc"), patch_code = float_code(patches, "patches");
  py::gil_scoped_release release;
  accumulate_cpu(acc.mutable_data(), acc_code, static_cast<float*>(wsum.mutable_data()),
                 acc.shape(0), shape3(acc, 1), z0, patches.data(), patch_code,
                 static_cast<const int64_t*>(origins.data()), patches.shape(0),
                 shape3(patches, 2), static_cast<const float*>(importance.data()));
}

// Finalises slab rows [row0, row1) of acc (C, D, Y, X) / wsum (D, Y, X) in place.
void finalize(const py::array& acc, const py::array& wsum, int64_t row0, int64_t row1,
              float threshold, int64_t ignore_index, int kind, py::array& labels,
              py::array& confidence, py::array& counts) {
  for (const py::array* a : std::initializer_list<const py::array*>{&acc, &wsum, &labels, &confidence, &counts}) {
    check_c_contiguous(*a, "array");
  }
  check_dtype(wsum, 'f', 4, "wsum");
  check_dtype(confidence, 'u', 1, "confidence");
  check_dtype(counts, 'i', 8, "counts");
  require(labels.dtype().kind() == 'u' && (labels.itemsize() == 1 || labels.itemsize() == 2),
          "labels must be uint8 or uint16");
  require(acc.ndim() == 4 && wsum.ndim() == 3, "acc must be 4-D and wsum 3-D");
  const int64_t c = acc.shape(0), depth = wsum.shape(0), plane = wsum.shape(1) * wsum.shape(2);
  require(0 <= row0 && row0 <= row1 && row1 <= depth, "rows out of range");
  const int64_t n = (row1 - row0) * plane;
  require(acc.size() == c * depth * plane && labels.size() == n && confidence.size() == n,
          "finalize: sizes of acc, wsum, labels and confidence disagree");
  require(counts.size() == (c == 1 ? 2 : c) + 2, "counts must have max(C, 2) + 2 entries");
  const int acc_code = float_code(acc, "acc");
  const char* acc_ptr = static_cast<const char*>(acc.data()) + row0 * plane * acc.itemsize();
  py::gil_scoped_release release;
  finalize_cpu(acc_ptr, acc_code, static_cast<const float*>(wsum.data()) + row0 * plane, c, n,
               depth * plane, threshold, ignore_index, kind, labels.mutable_data(),
               (int)labels.itemsize(), static_cast<uint8_t*>(confidence.mutable_data()),
               static_cast<int64_t*>(counts.mutable_data()));
}

#ifdef WITH_CUDA
// CUDA entry points take device pointers (as integers) and shapes checked by native.py.
void extract_patches_gpu(uintptr_t volume, int64_t m, std::vector<int64_t> vol,
                         const py::array& origins, std::vector<int64_t> patch, float pad_value,
                         uintptr_t out, int out_dtype, uintptr_t stream) {
  const int64_t b = origins.shape(0);
  check_origins(origins, b);
  const int64_t* o = static_cast<const int64_t*>(origins.data());
  py::gil_scoped_release release;
  extract_patches_cuda(reinterpret_cast<const float*>(volume), m, {vol[0], vol[1], vol[2]}, o, b,
                       {patch[0], patch[1], patch[2]}, pad_value, reinterpret_cast<void*>(out),
                       out_dtype, stream);
}

void accumulate_gpu(uintptr_t acc, int acc_dtype, uintptr_t wsum, int64_t c,
                    std::vector<int64_t> slab, int64_t z0, uintptr_t patches, int patch_dtype,
                    const py::array& origins, std::vector<int64_t> patch, uintptr_t importance,
                    uintptr_t stream) {
  const int64_t b = origins.shape(0);
  check_origins(origins, b);
  const int64_t* o = static_cast<const int64_t*>(origins.data());
  py::gil_scoped_release release;
  accumulate_cuda(reinterpret_cast<void*>(acc), acc_dtype, reinterpret_cast<float*>(wsum), c,
                  {slab[0], slab[1], slab[2]}, z0, reinterpret_cast<const void*>(patches),
                  patch_dtype, o, b, {patch[0], patch[1], patch[2]},
                  reinterpret_cast<const float*>(importance), stream);
}

void finalize_gpu(uintptr_t acc, int acc_dtype, uintptr_t wsum, int64_t c, int64_t n,
                  int64_t chan_stride, float threshold, int64_t ignore_index, int kind, uintptr_t labels,
                  int label_bytes, uintptr_t confidence, uintptr_t counts, uintptr_t stream) {
  py::gil_scoped_release release;
  finalize_cuda(reinterpret_cast<const void*>(acc), acc_dtype, reinterpret_cast<const float*>(wsum),
                c, n, chan_stride, threshold, ignore_index, kind, reinterpret_cast<void*>(labels),
                label_bytes,
                reinterpret_cast<uint8_t*>(confidence), reinterpret_cast<int64_t*>(counts), stream);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}
#endif

py::dict build_info() {
  py::dict info;
  info["version"] = ATSO_FAST_VERSION;
  info["cpu_isa"] = cpu_isa();
#ifdef WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "atso-fast native kernels (CPU OpenMP, optional CUDA). Use atso_fast.native.";
  m.def("build_info", &build_info, "What the module was built with.");
  m.def("set_kernel_threads", &set_kernel_threads, py::arg("n"),
        "OpenMP threads of the CPU kernels called from this Python thread (0: OpenMP default)");
  m.def("kernel_threads", &kernel_threads, "OpenMP threads the CPU kernels use from this thread");
  m.def("set_cpu_isa", [](const std::string& isa) { return set_cpu_isa(isa.c_str()); },
        "Force the 'generic' CPU kernels, or back to 'auto'; False if unavailable.");
  m.def("extract_patches", &extract_patches, "CPU window gather into out (B, M, pz, py, px).");
  m.def("accumulate", &accumulate, "CPU gaussian-weighted accumulation into a slab.");
  m.def("finalize", &finalize, "CPU labels/confidence/counts from a blended slab.");
#ifdef WITH_CUDA
  m.def("extract_patches_cuda", &extract_patches_gpu, "CUDA window gather (device pointers).");
  m.def("accumulate_cuda", &accumulate_gpu, "CUDA gaussian-weighted accumulation (device pointers).");
  m.def("finalize_cuda", &finalize_gpu, "CUDA labels/confidence/counts (device pointers).");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 without a driver).");
#endif
}
