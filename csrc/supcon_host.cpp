// Host (CPU) implementation of the hard-negative SupCon backward: the same tiled algorithm as the
// CUDA kernels (supcon_mma.cuh, supcon_simt.cuh) on top of the same per-element math (supcon_math.h):
// RowCoef constants, candidate bias (NaN for ignored columns), explicit zero diagonal, zero rows for
// ignored anchors.
//   for every modality m and row block I of the anchor-row range (threads pull blocks from a counter):
//     for every column block J: S = Z_I Z_J^T (recomputed), A = G_IJ + G_JI^T, dZ_I += A Z_J
// Coefficients and dZ are accumulated in double (s in the input precision).
// Memory: per thread O((BI + BJ) * D + BI * BJ) scratch; nothing of size N x N.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "supcon_api.h"
#include "supcon_math.h"

namespace mcncl {
namespace {

constexpr long long kBI = 32;  // rows per block
constexpr long long kBJ = 64;  // columns per block

// dot product with 8 independent partial sums (vectorisable without reassociation flags)
template <typename T>
inline T dot(const T* a, const T* b, long long d) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  long long k = 0;
  for (; k + 8 <= d; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[k + l] * b[k + l];
  for (; k < d; ++k) acc[0] += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
void load_block(const SupconBackwardArgs& a, long long m, long long row0, long long rows, T* dst) {
  const T* z = reinterpret_cast<const T*>(a.z);
  for (long long r = 0; r < rows; ++r)
    for (long long k = 0; k < a.d; ++k)
      dst[r * a.d + k] = z[m * a.sz_m + (row0 + r) * a.sz_n + k * a.sz_d];
}

template <typename T>
void run_host(const SupconBackwardArgs& a, long long rows, int num_threads) {
  const long long n = a.n, d = a.d, row0 = a.row_start;
  const long long row_blocks = (rows + kBI - 1) / kBI;
  const long long total = row_blocks * a.m;
  const float* theta = reinterpret_cast<const float*>(a.theta);
  const float* logd = reinterpret_cast<const float*>(a.logd);
  const float* w = reinterpret_cast<const float*>(a.w);
  const float* inv_npos = reinterpret_cast<const float*>(a.inv_npos);
  const int* labels = reinterpret_cast<const int*>(a.labels);
  T* grad = reinterpret_cast<T*>(a.grad);
  const double inv_tau = a.inv_tau, kappa = a.inv_tau * supcon::kLog2e;
  std::atomic<long long> next{0};

  auto worker = [&]() {
    std::vector<T> zi(kBI * d), zj(kBJ * d);
    std::vector<double> coef(kBI * kBJ), out(kBI * d);  // double accumulation on the host
    std::vector<supcon::RowCoef<double>> si(kBI), sj(kBJ);
    auto coef_of = [&](long long m, long long i) {
      return supcon::load_row_coef<double>(theta, logd, w, inv_npos, labels, m, i, n, inv_tau, 1.0);
    };
    for (long long task = next++; task < total; task = next++) {
      const long long m = task / row_blocks;
      const long long r0 = (task % row_blocks) * kBI;  // first output row of the block
      const long long i0 = row0 + r0;                   // its row of z
      const long long bi = std::min(kBI, rows - r0);
      load_block<T>(a, m, i0, bi, zi.data());
      for (long long r = 0; r < bi; ++r) si[r] = coef_of(m, i0 + r);
      std::fill(out.begin(), out.end(), 0.0);
      for (long long j0 = 0; j0 < n; j0 += kBJ) {
        const long long bj = std::min(kBJ, n - j0);
        load_block<T>(a, m, j0, bj, zj.data());
        for (long long c = 0; c < bj; ++c) sj[c] = coef_of(m, j0 + c);
        for (long long r = 0; r < bi; ++r)
          for (long long c = 0; c < bj; ++c) {
            const double s = static_cast<double>(dot<T>(&zi[r * d], &zj[c * d], d)) +
                             supcon::candidate_bias<double>(sj[c].label);
            coef[r * kBJ + c] = i0 + r == j0 + c ? 0.0 : supcon::pair_coeff<double>(s, si[r], sj[c], kappa);
          }
        for (long long r = 0; r < bi; ++r) {
          double* o = &out[r * d];
          for (long long c = 0; c < bj; ++c) {
            const double g = coef[r * kBJ + c];
            if (g == 0.0) continue;
            const T* zc = &zj[c * d];
            for (long long k = 0; k < d; ++k) o[k] += g * zc[k];
          }
        }
      }
      for (long long r = 0; r < bi; ++r) {
        const bool live = supcon::is_live(si[r].label);  // ignored anchors get exactly zero
        T* g = grad + (m * rows + r0 + r) * d;
        for (long long k = 0; k < d; ++k) g[k] = live ? static_cast<T>(out[r * d + k]) : T(0);
      }
    }
  };

  int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = static_cast<int>(std::max<long long>(1, std::min<long long>(threads, total)));
  if (threads == 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
}

}  // namespace

void supcon_backward_host(const SupconBackwardArgs& args, int num_threads) {
  const long long rows = supcon_rows_to_compute(args, "supcon_backward_host");
  if (rows == 0) return;
  if (args.dtype == kFloat32) return run_host<float>(args, rows, num_threads);
  if (args.dtype == kFloat64) return run_host<double>(args, rows, num_threads);
  throw std::invalid_argument("supcon_backward_host: z must be float32 or float64 (dtype code " +
                              std::to_string(args.dtype) + ")");
}

#ifndef MCNCL_WITH_CUDA
// Host-only build (no nvcc): the CUDA entry point exists and says why it cannot run.
void supcon_backward_cuda(const SupconBackwardArgs&, std::uintptr_t) {
  throw std::runtime_error("mcncl_fast._C was built without CUDA: supcon_backward_cuda is unavailable");
}
#endif

}  // namespace mcncl
