// Host-only build: the CUDA entry points report that no CUDA code is present.
#ifndef MCNCL_WITH_CUDA
#include "cuda_api.h"

namespace mcncl {
bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
}  // namespace mcncl
#endif
