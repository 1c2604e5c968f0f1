// pybind11 bindings of mcncl_fast._C. Pointer API (DESIGN.md §2): Python passes
// data pointers, sizes and the CUDA stream; nothing here links against libtorch.
#include <pybind11/pybind11.h>

#include "cuda_api.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mcncl_fast native extension (host C++ and, when built with nvcc, CUDA kernels)";
  m.def("version", [] { return std::string("0.1.0"); });
  m.def("has_cuda", [] { return mcncl::cuda_compiled(); },
        "True when the CUDA kernels were compiled into this build");
  m.def("cuda_device_count", [] { return mcncl::cuda_device_count(); },
        "Number of CUDA devices the runtime sees (0 without a driver or without CUDA support)");
}
