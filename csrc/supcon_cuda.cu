// CUDA entry point of the hard-negative SupCon backward: dL/dz'_i = sum_j (G_ij + G_ji) z'_j
// (math in supcon_math.h, shared with the host code). Checks the arguments, picks the kernel and
// launches it on the caller's stream:
//   float16 / bfloat16 -> supcon_mma.cu   (tensor cores, float32 accumulation)
//   float32            -> supcon_simt.cu  (IEEE FMA)
// Both stage z with 16-byte cp.async when its layout allows (unit stride along D, D and the row /
// modality strides multiples of 16 bytes, 16-byte aligned base) and with scalar loads otherwise.
// Nothing of size N x N is stored; grad is a contiguous float32 [M, row_count, D].
#include "supcon_api.h"
#include "supcon_device.cuh"

namespace mcncl {

void supcon_backward_cuda(const SupconBackwardArgs& a, std::uintptr_t stream_handle) {
  const long long rows = supcon::checked_rows(a);
  if (rows == 0) return;
  const bool sixteen = a.dtype != kFloat32;
  const supcon::Params p = supcon::make_params(a, rows);
  const bool vec = supcon::vector_layout(a);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (sixteen)
    supcon::launch_supcon_mma(p, static_cast<int>(a.m), a.dtype == kBFloat16, vec, stream);
  else
    supcon::launch_supcon_simt(p, static_cast<int>(a.m), vec, stream);
  supcon::check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace mcncl
