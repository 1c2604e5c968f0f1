// Entry points of the float32 SupCon backward kernels (body: supcon_simt.cuh).
#include "supcon_simt.cuh"

namespace mcncl {
namespace supcon {
namespace {

using namespace simt;

__global__ void __launch_bounds__(kThreads, 2) supcon_backward_f32_cpasync(Params p) { simt_backward<true>(p); }
__global__ void __launch_bounds__(kThreads, 2) supcon_backward_f32_scalar(Params p) { simt_backward<false>(p); }

}  // namespace

void launch_supcon_simt(const Params& p, int m, bool vec, cudaStream_t stream) {
  const LaunchShape s = simt_shape(p, m);
  void (*kernel)(Params) = vec ? supcon_backward_f32_cpasync : supcon_backward_f32_scalar;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(s.smem)),
             "shared memory opt-in");
  kernel<<<dim3(s.gx, s.gy, s.gz), s.threads, s.smem, stream>>>(p);
}

}  // namespace supcon
}  // namespace mcncl
