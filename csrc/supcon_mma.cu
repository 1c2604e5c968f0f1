// Entry points of the float16 / bfloat16 SupCon backward kernels (body: supcon_mma.cuh).
#include "supcon_mma.cuh"

namespace mcncl {
namespace supcon {
namespace {

using namespace mma;

#define MCNCL_MMA_KERNEL(name, bf16, vec) \
  __global__ void __launch_bounds__(kThreads, kMinBlocks) name(Params p) { mma_backward<bf16, vec>(p); }
MCNCL_MMA_KERNEL(supcon_backward_f16_cpasync, false, true)
MCNCL_MMA_KERNEL(supcon_backward_bf16_cpasync, true, true)
MCNCL_MMA_KERNEL(supcon_backward_f16_scalar, false, false)
MCNCL_MMA_KERNEL(supcon_backward_bf16_scalar, true, false)
#undef MCNCL_MMA_KERNEL

}  // namespace

void launch_supcon_mma(const Params& p, int m, bool bf16, bool vec, cudaStream_t stream) {
  const LaunchShape s = mma_shape(p, m);
  void (*kernel)(Params) = bf16 ? (vec ? supcon_backward_bf16_cpasync : supcon_backward_bf16_scalar)
                                : (vec ? supcon_backward_f16_cpasync : supcon_backward_f16_scalar);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(s.smem)),
             "shared memory opt-in");
  kernel<<<dim3(s.gx, s.gy, s.gz), s.threads, s.smem, stream>>>(p);
}

}  // namespace supcon
}  // namespace mcncl
