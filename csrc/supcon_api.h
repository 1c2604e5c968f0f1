// Entry points of the hard-negative SupCon backward (pointer API, DESIGN.md §2).
// The host version is always built (supcon_host.cpp); the CUDA version lives in supcon_cuda.cu,
// and host-only builds get a stub that throws (end of supcon_host.cpp), as in cuda_api.h.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mcncl {

// dtype codes of z. The one definition: module.cpp exports them to Python as mcncl_fast._C.SupconDType
// (members named as the torch dtypes: float32, float16, bfloat16, float64), read by mcncl_fast/ops/supcon.py.
enum SupconDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct SupconBackwardArgs {
  std::uintptr_t z;         // [M, N, D] normalised embeddings, element strides sz_m, sz_n, sz_d
  int dtype;                // SupconDType of z
  long long m, n, d;
  long long sz_m, sz_n, sz_d;
  std::uintptr_t labels;    // int32 [N]
  std::uintptr_t theta;     // float32 [M, N] hard-negative thresholds
  std::uintptr_t logd;      // float32 [M, N] log-denominators
  std::uintptr_t w;         // float32 [M, N] g_m / A for anchors with a positive, else 0
  std::uintptr_t inv_npos;  // float32 [N] 1 / |P_i| (0 without positives)
  std::uintptr_t w_scale;   // float32 [M]: max |w| of each modality (the CUDA kernels stage A / w_scale
                            // in 16 bits; 0 means the modality's gradient is zero). Unused on the host.
  double inv_tau;
  std::uintptr_t grad;      // contiguous [M, row_count, D] output: float64 when z is float64, else float32
  long long row_start = 0;  // anchor rows [row_start, row_start + row_count) of z get a gradient (against
  long long row_count = -1; // all N columns); -1: all rows from row_start on. theta/logd/w stay [M, N].
};

// The pointer API's arguments in the order of the Python bindings (module.cpp) and of the kernel
// simulation's C entry point (sim/supcon_sim.cpp): one place that fills the struct.
inline SupconBackwardArgs supcon_backward_args(std::uintptr_t z, int dtype, long long m, long long n, long long d,
                                               long long sz_m, long long sz_n, long long sz_d, std::uintptr_t labels,
                                               std::uintptr_t theta, std::uintptr_t logd, std::uintptr_t w,
                                               std::uintptr_t inv_npos, std::uintptr_t w_scale, double inv_tau,
                                               std::uintptr_t grad, long long row_start, long long row_count) {
  SupconBackwardArgs a;
  a.z = z; a.dtype = dtype; a.m = m; a.n = n; a.d = d; a.sz_m = sz_m; a.sz_n = sz_n; a.sz_d = sz_d;
  a.labels = labels; a.theta = theta; a.logd = logd; a.w = w; a.inv_npos = inv_npos; a.w_scale = w_scale;
  a.inv_tau = inv_tau; a.grad = grad; a.row_start = row_start; a.row_count = row_count;
  return a;
}

// Validated number of output rows of the row range (row_count < 0 means up to N); throws
// std::invalid_argument (ValueError in Python) when the range does not lie inside [0, N].
inline long long supcon_row_count(const SupconBackwardArgs& a, const char* who) {
  const long long count = a.row_count < 0 ? a.n - a.row_start : a.row_count;
  if (a.row_start < 0 || a.row_start > a.n || count < 0 || count > a.n - a.row_start)
    throw std::invalid_argument(std::string(who) + ": row range [" + std::to_string(a.row_start) + ", +" +
                                std::to_string(a.row_count) + ") is not inside [0, " + std::to_string(a.n) + ")");
  return count;
}

// The checks both entry points make first (who: the entry point, for the messages): sizes not
// negative, the row range inside [0, N]. Returns the number of output rows, 0 when there is nothing
// to compute (no modality, no row or D = 0: the dtype is then not checked).
inline long long supcon_rows_to_compute(const SupconBackwardArgs& a, const char* who) {
  if (a.m < 0 || a.n < 0 || a.d < 0) throw std::invalid_argument(std::string(who) + ": negative size");
  const long long rows = supcon_row_count(a, who);
  return a.m == 0 || a.d == 0 ? 0 : rows;
}

// Host implementation (float32 / float64 z), multi-threaded; num_threads <= 0: all cores.
void supcon_backward_host(const SupconBackwardArgs& args, int num_threads);

// CUDA implementation (float32 / float16 / bfloat16 z) on the given cudaStream_t (as an integer).
// 16-byte cp.async staging when z has unit stride along D, D is a multiple of 16 bytes' worth of
// elements and the rows are 16-byte aligned; any other layout takes a scalar-load path (same kernels).
void supcon_backward_cuda(const SupconBackwardArgs& args, std::uintptr_t stream);

// Host check of the tile schedule and fragment-layout helpers the CUDA kernels use (empty: all good).
std::vector<std::string> supcon_layout_check();

}  // namespace mcncl
