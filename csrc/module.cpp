// pybind11 bindings of mcncl_fast._C. Pointer API (DESIGN.md §2): Python passes
// data pointers, sizes and the CUDA stream; nothing here links against libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_api.h"
#include "supcon_api.h"

namespace py = pybind11;

namespace {
mcncl::SupconBackwardArgs supcon_args(std::uintptr_t z, int dtype, long long m, long long n, long long d,
                                      long long sz_m, long long sz_n, long long sz_d, std::uintptr_t labels,
                                      std::uintptr_t theta, std::uintptr_t logd, std::uintptr_t w,
                                      std::uintptr_t inv_npos, std::uintptr_t w_scale, double inv_tau,
                                      std::uintptr_t grad, long long row_start, long long row_count) {
  mcncl::SupconBackwardArgs a;
  a.z = z; a.dtype = dtype; a.m = m; a.n = n; a.d = d; a.sz_m = sz_m; a.sz_n = sz_n; a.sz_d = sz_d;
  a.labels = labels; a.theta = theta; a.logd = logd; a.w = w; a.inv_npos = inv_npos; a.w_scale = w_scale;
  a.inv_tau = inv_tau; a.grad = grad; a.row_start = row_start; a.row_count = row_count;
  return a;
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
  m.def(
      "supcon_backward_host",
      [](std::uintptr_t z, int dtype, long long m, long long n, long long d, long long sz_m, long long sz_n,
         long long sz_d, std::uintptr_t labels, std::uintptr_t theta, std::uintptr_t logd, std::uintptr_t w,
         std::uintptr_t inv_npos, std::uintptr_t w_scale, double inv_tau, std::uintptr_t grad, int num_threads,
         long long row_start, long long row_count) {
        auto a = supcon_args(z, dtype, m, n, d, sz_m, sz_n, sz_d, labels, theta, logd, w, inv_npos, w_scale,
                             inv_tau, grad, row_start, row_count);
        py::gil_scoped_release release;
        mcncl::supcon_backward_host(a, num_threads);
      },
      py::arg("z"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("d"), py::arg("sz_m"), py::arg("sz_n"),
      py::arg("sz_d"), py::arg("labels"), py::arg("theta"), py::arg("logd"), py::arg("w"), py::arg("inv_npos"),
      py::arg("w_scale"), py::arg("inv_tau"), py::arg("grad"), py::arg("num_threads") = 0,
      py::arg("row_start") = 0, py::arg("row_count") = -1,
      "dL/dz' of the hard-negative SupCon loss on the CPU (float32/float64 z; grad in the same precision).\n"
      "Only anchor rows [row_start, row_start + row_count) (row_count -1: to N) are computed, against all N\n"
      "columns; grad is a contiguous [M, row_count, D] array. Rows with label < 0 are ignored (w must be 0).");
  m.def(
      "supcon_backward_cuda",
      [](std::uintptr_t z, int dtype, long long m, long long n, long long d, long long sz_m, long long sz_n,
         long long sz_d, std::uintptr_t labels, std::uintptr_t theta, std::uintptr_t logd, std::uintptr_t w,
         std::uintptr_t inv_npos, std::uintptr_t w_scale, double inv_tau, std::uintptr_t grad,
         std::uintptr_t stream, long long row_start, long long row_count) {
        auto a = supcon_args(z, dtype, m, n, d, sz_m, sz_n, sz_d, labels, theta, logd, w, inv_npos, w_scale,
                             inv_tau, grad, row_start, row_count);
        py::gil_scoped_release release;
        mcncl::supcon_backward_cuda(a, stream);
      },
      py::arg("z"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("d"), py::arg("sz_m"), py::arg("sz_n"),
      py::arg("sz_d"), py::arg("labels"), py::arg("theta"), py::arg("logd"), py::arg("w"), py::arg("inv_npos"),
      py::arg("w_scale"), py::arg("inv_tau"), py::arg("grad"), py::arg("stream"),
      py::arg("row_start") = 0, py::arg("row_count") = -1,
      "dL/dz' of the hard-negative SupCon loss on CUDA (float32/float16/bfloat16 z, float32 grad), async on\n"
      "stream. Row range, grad layout and ignored rows as supcon_backward_host.");
  m.def("supcon_layout_check", [] { return mcncl::supcon_layout_check(); },
        "Errors found in the CUDA kernels' tile schedule / fragment-layout helpers, checked on the host");
}
