// CPU simulation of the SupCon backward CUDA kernels (test only, not part of the extension): runs the
// kernel bodies of supcon_mma.cuh and supcon_simt.cuh unchanged, block after block, one std::thread per
// CUDA thread (sim/cuda_sim.h), with the entry point's argument checks, kernel choice and launch
// shapes. tests/test_supcon_extension.py builds it with the host C++ compiler and calls
// supcon_sim_backward through ctypes with the arguments of _C.supcon_backward_cuda.
#define MCNCL_SUPCON_SIM 1

#include <cstdio>
#include <exception>
#include <memory>
#include <thread>

#include "supcon_mma.cuh"
#include "supcon_simt.cuh"

namespace mcncl {
namespace supcon {
namespace {

template <typename Body>
void run_grid(const LaunchShape& s, bool land_at_wait, Body body) {
  const int warps = s.threads / 32;
  std::vector<float4> smem((s.smem + sizeof(float4) - 1) / sizeof(float4));  // 16-byte aligned
  for (unsigned bz = 0; bz < s.gz; ++bz)
    for (unsigned by = 0; by < s.gy; ++by)
      for (unsigned bx = 0; bx < s.gx; ++bx) {
        // fresh shared memory holds garbage on the GPU: fill it with NaN bits so that reading
        // something never written shows up
        std::fill(smem.begin(), smem.end(), float4{NAN, NAN, NAN, NAN});
        std::barrier<> block_barrier(s.threads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
        std::vector<sim::WarpTable> tables(warps);
        for (int w = 0; w < warps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (int t = 0; t < s.threads; ++t)
          threads.emplace_back([&, t] {
            sim::Thread self;
            self.thread = sim::Dim3{static_cast<unsigned>(t), 0, 0};
            self.block = sim::Dim3{bx, by, bz};
            self.grid = sim::Dim3{s.gx, s.gy, s.gz};
            self.block_dim = sim::Dim3{static_cast<unsigned>(s.threads), 1, 1};
            self.smem = reinterpret_cast<unsigned char*>(smem.data());
            self.block_barrier = &block_barrier;
            self.warp_barrier = warp_barriers[t / 32].get();
            self.warp_table = &tables[t / 32];
            self.land_at_wait = land_at_wait;
            sim::self = &self;
            body();
          });
        for (auto& th : threads) th.join();
      }
}

void simulate(const SupconBackwardArgs& a, bool land_at_wait) {
  const long long rows = checked_rows(a);
  if (rows == 0) return;
  const Params p = make_params(a, rows);
  const bool vec = vector_layout(a);
  const int m = static_cast<int>(a.m);
  if (a.dtype == kFloat32) {
    const LaunchShape s = simt::simt_shape(p, m);
    if (vec)
      run_grid(s, land_at_wait, [&] { simt::simt_backward<true>(p); });
    else
      run_grid(s, land_at_wait, [&] { simt::simt_backward<false>(p); });
    return;
  }
  const LaunchShape s = mma::mma_shape(p, m);
  const bool bf16 = a.dtype == kBFloat16;
  if (bf16 && vec) run_grid(s, land_at_wait, [&] { mma::mma_backward<true, true>(p); });
  if (bf16 && !vec) run_grid(s, land_at_wait, [&] { mma::mma_backward<true, false>(p); });
  if (!bf16 && vec) run_grid(s, land_at_wait, [&] { mma::mma_backward<false, true>(p); });
  if (!bf16 && !vec) run_grid(s, land_at_wait, [&] { mma::mma_backward<false, false>(p); });
}

}  // namespace
}  // namespace supcon
}  // namespace mcncl

// Same arguments as _C.supcon_backward_cuda (host pointers), then the row range and the cp.async
// landing mode. Returns 0, or 1 after printing the exception (invalid arguments).
extern "C" int supcon_sim_backward(std::uintptr_t z, int dtype, long long m, long long n, long long d, long long sz_m,
                                   long long sz_n, long long sz_d, std::uintptr_t labels, std::uintptr_t theta,
                                   std::uintptr_t logd, std::uintptr_t w, std::uintptr_t inv_npos,
                                   std::uintptr_t w_scale, double inv_tau, std::uintptr_t grad, long long row_start,
                                   long long row_count, int land_at_wait) {
  const mcncl::SupconBackwardArgs a = mcncl::supcon_backward_args(
      z, dtype, m, n, d, sz_m, sz_n, sz_d, labels, theta, logd, w, inv_npos, w_scale, inv_tau, grad, row_start, row_count);
  try {
    mcncl::supcon::simulate(a, land_at_wait != 0);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "supcon_sim_backward: %s\n", e.what());
    return 1;
  }
}
