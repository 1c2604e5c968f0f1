// CUDA build: runtime queries. Never throws without a driver (returns 0 devices).
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace mcncl {
bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "insufficient driver" error
    return 0;
  }
  return count;
}
}  // namespace mcncl
