// Entry points of the hard-negative SupCon backward (pointer API, DESIGN.md §2).
// The host version is always built (supcon_host.cpp); the CUDA version lives in supcon_cuda.cu,
// and host-only builds get a stub that throws (end of supcon_host.cpp), as in cuda_api.h.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mcncl {

// dtype codes shared with mcncl_fast/ops/supcon.py
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

// Validated number of output rows of the row range (row_count < 0 means up to N); throws
// std::invalid_argument (ValueError in Python) when the range does not lie inside [0, N].
inline long long supcon_row_count(const SupconBackwardArgs& a, const char* who) {
  const long long count = a.row_count < 0 ? a.n - a.row_start : a.row_count;
  if (a.row_start < 0 || a.row_start > a.n || count < 0 || count > a.n - a.row_start)
    throw std::invalid_argument(std::string(who) + ": row range [" + std::to_string(a.row_start) + ", +" +
                                std::to_string(a.row_count) + ") is not inside [0, " + std::to_string(a.n) + ")");
  return count;
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
