// CUDA entry point of the hard-negative SupCon backward: dL/dz'_i = sum_j (G_ij + G_ji) z'_j
// (math in supcon_math.h, shared with the host code). Checks the arguments, picks the kernel and
// launches it on the caller's stream:
//   float16 / bfloat16 -> supcon_mma.cu   (tensor cores, float32 accumulation)
//   float32            -> supcon_simt.cu  (IEEE FMA)
// Both stage z with 16-byte cp.async when its layout allows (unit stride along D, D and the row /
// modality strides multiples of 16 bytes, 16-byte aligned base) and with scalar loads otherwise.
// Nothing of size N x N is stored; grad is a contiguous float32 [M, row_count, D].
#include <climits>

#include "supcon_api.h"
#include "supcon_device.cuh"

namespace mcncl {

void supcon_backward_cuda(const SupconBackwardArgs& a, std::uintptr_t stream_handle) {
  if (a.m < 0 || a.n < 0 || a.d < 0) throw std::invalid_argument("supcon_backward_cuda: negative size");
  const long long rows = supcon_row_count(a, "supcon_backward_cuda");
  if (a.m == 0 || rows == 0 || a.d == 0) return;
  if (a.m > 65535) throw std::invalid_argument("supcon_backward_cuda: at most 65535 modalities");
  if (a.n > INT_MAX / 2 || a.d > INT_MAX / 2)
    throw std::invalid_argument("supcon_backward_cuda: N and D must stay below 2^30");
  const bool sixteen = a.dtype == kFloat16 || a.dtype == kBFloat16;
  if (!sixteen && a.dtype != kFloat32)
    throw std::invalid_argument("supcon_backward_cuda: z must be float32, float16 or bfloat16 (dtype code " +
                                std::to_string(a.dtype) + ")");

  supcon::Params p;
  p.z = reinterpret_cast<const void*>(a.z);
  p.n = static_cast<int>(a.n);
  p.d = static_cast<int>(a.d);
  p.sm = a.sz_m; p.sn = a.sz_n; p.sd = a.sz_d;
  p.labels = reinterpret_cast<const int*>(a.labels);
  p.theta = reinterpret_cast<const float*>(a.theta);
  p.logd = reinterpret_cast<const float*>(a.logd);
  p.w = reinterpret_cast<const float*>(a.w);
  p.inv_npos = reinterpret_cast<const float*>(a.inv_npos);
  p.w_scale = reinterpret_cast<const float*>(a.w_scale);
  p.inv_tau = static_cast<float>(a.inv_tau);
  p.kappa = static_cast<float>(a.inv_tau * supcon::kLog2e);
  p.grad = reinterpret_cast<float*>(a.grad);
  p.row_start = static_cast<int>(a.row_start);
  p.rows = static_cast<int>(rows);

  // 16-byte pieces along D: 8 elements of 16 bits or 4 of 32; every row start 16-byte aligned
  const long long piece = sixteen ? 8 : 4;
  const bool vec = a.sz_d == 1 && a.d % piece == 0 && a.sz_n % piece == 0 && (a.m == 1 || a.sz_m % piece == 0) &&
                   a.z % 16 == 0;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (sixteen)
    supcon::launch_supcon_mma(p, static_cast<int>(a.m), a.dtype == kBFloat16, vec, stream);
  else
    supcon::launch_supcon_simt(p, static_cast<int>(a.m), vec, stream);
  supcon::check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace mcncl
