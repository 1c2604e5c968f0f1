// pybind11 bindings of mcncl_fast._C. Pointer API (DESIGN.md §2): Python passes
// data pointers, sizes and the CUDA stream; nothing here links against libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_api.h"
#include "supcon_api.h"

namespace py = pybind11;

namespace {

// Binds one entry point of the SupCon backward: the shared pointer-API arguments (supcon_api.h,
// supcon_backward_args), then the entry's own argument `extra` (host: thread count; CUDA: stream),
// then the row range. The GIL is released while it runs.
template <typename Extra, typename ExtraArg>
void def_supcon_backward(py::module_& m, const char* name, void (*entry)(const mcncl::SupconBackwardArgs&, Extra),
                         ExtraArg extra, const char* doc) {
  m.def(
      name,
      [entry](std::uintptr_t z, int dtype, long long m, long long n, long long d, long long sz_m, long long sz_n,
              long long sz_d, std::uintptr_t labels, std::uintptr_t theta, std::uintptr_t logd, std::uintptr_t w,
              std::uintptr_t inv_npos, std::uintptr_t w_scale, double inv_tau, std::uintptr_t grad, Extra extra,
              long long row_start, long long row_count) {
        const auto a = mcncl::supcon_backward_args(z, dtype, m, n, d, sz_m, sz_n, sz_d, labels, theta, logd, w,
                                                   inv_npos, w_scale, inv_tau, grad, row_start, row_count);
        py::gil_scoped_release release;
        entry(a, extra);
      },
      py::arg("z"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("d"), py::arg("sz_m"), py::arg("sz_n"),
      py::arg("sz_d"), py::arg("labels"), py::arg("theta"), py::arg("logd"), py::arg("w"), py::arg("inv_npos"),
      py::arg("w_scale"), py::arg("inv_tau"), py::arg("grad"), extra, py::arg("row_start") = 0,
      py::arg("row_count") = -1, doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mcncl_fast native extension (host C++ and, when built with nvcc, CUDA kernels)";
  m.def("version", [] { return std::string("0.1.0"); });
  m.def("has_cuda", [] { return mcncl::cuda_compiled(); },
        "True when the CUDA kernels were compiled into this build");
  m.def("cuda_device_count", [] { return mcncl::cuda_device_count(); },
        "Number of CUDA devices the runtime sees (0 without a driver or without CUDA support)");
  // Hard-negative SupCon backward (csrc/supcon_*.{h,cpp,cu}): pointers are integers (tensor.data_ptr()).
  py::enum_<mcncl::SupconDType>(m, "SupconDType", "dtype codes of z (the `dtype` argument, as int)")
      .value("float32", mcncl::kFloat32)
      .value("float16", mcncl::kFloat16)
      .value("bfloat16", mcncl::kBFloat16)
      .value("float64", mcncl::kFloat64);
  def_supcon_backward<int>(
      m, "supcon_backward_host", &mcncl::supcon_backward_host, py::arg("num_threads") = 0,
      "dL/dz' of the hard-negative SupCon loss on the CPU (float32/float64 z; grad in the same precision).\n"
      "Only anchor rows [row_start, row_start + row_count) (row_count -1: to N) are computed, against all N\n"
      "columns; grad is a contiguous [M, row_count, D] array. Rows with label < 0 are ignored (w must be 0).");
  def_supcon_backward<std::uintptr_t>(
      m, "supcon_backward_cuda", &mcncl::supcon_backward_cuda, py::arg("stream"),
      "dL/dz' of the hard-negative SupCon loss on CUDA (float32/float16/bfloat16 z, float32 grad), async on\n"
      "stream. Row range, grad layout and ignored rows as supcon_backward_host.");
  m.def("supcon_layout_check", [] { return mcncl::supcon_layout_check(); },
        "Errors found in the CUDA kernels' tile schedule / fragment-layout helpers, checked on the host");
}
