// Entry points implemented in .cu files; host-only builds get the stubs in cuda_stubs.cpp.
#pragma once

namespace mcncl {
bool cuda_compiled();
int cuda_device_count();
}  // namespace mcncl
