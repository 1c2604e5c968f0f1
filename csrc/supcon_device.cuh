// Pieces shared by the SupCon backward kernels (supcon_mma.cuh: float16 / bfloat16 on tensor cores,
// supcon_simt.cuh: float32 FMA): kernel parameters and their construction, the cooperative tile copy
// and the per-row constants. Index math lives in supcon_math.h, PTX wrappers in supcon_ptx.cuh.
// Also compiled on the host by the kernel simulation (sim/, MCNCL_SUPCON_SIM).
#pragma once

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "supcon_api.h"
#include "supcon_math.h"
#if defined(MCNCL_SUPCON_SIM)
#include "sim/cuda_sim.h"  // CPU stand-ins for the CUDA built-ins and the PTX wrappers
#else
#include "supcon_ptx.cuh"
#endif

namespace mcncl {
namespace supcon {

struct Params {
  const void* z;      // [M, N, D], element strides sm, sn, sd
  int n, d;
  long long sm, sn, sd;
  const int* labels;  // [N]; < 0: ignored row
  const float* theta;
  const float* logd;
  const float* w;
  const float* inv_npos;
  const float* w_scale;  // [M]
  float inv_tau;
  float kappa;           // log2(e) / tau
  float* grad;           // [M, rows, D]
  int row_start, rows;   // anchor rows [row_start, row_start + rows) of z
};

// Chunk width along D: each block writes the output columns of one chunk.
constexpr int kChunkD = 128;

// Grid, block and dynamic shared memory of one launch.
struct LaunchShape {
  unsigned gx, gy, gz;
  int threads;
  size_t smem;
};

// Argument checks of supcon_backward_cuda (the CPU simulation runs them too): the number of output
// rows, 0 when there is nothing to compute; std::invalid_argument for what the kernels cannot take.
inline long long checked_rows(const SupconBackwardArgs& a) {
  const long long rows = supcon_rows_to_compute(a, "supcon_backward_cuda");
  if (rows == 0) return 0;
  if (a.m > 65535) throw std::invalid_argument("supcon_backward_cuda: at most 65535 modalities");
  // grid.y = D-chunks <= 65535; a block's pipeline steps (column tiles of 32 or 64 x D-chunks) fit an int
  if (a.n > INT_MAX / 2 || a.d > 65535LL * kChunkD || (a.n / 32 + 1) * (a.d / kChunkD + 1) > INT_MAX)
    throw std::invalid_argument("supcon_backward_cuda: N or D too large for the kernels' index types");
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    throw std::invalid_argument("supcon_backward_cuda: z must be float32, float16 or bfloat16 (dtype code " +
                                std::to_string(a.dtype) + ")");
  return rows;
}

// Kernel parameters from the API arguments; rows = checked_rows(a).
inline Params make_params(const SupconBackwardArgs& a, long long rows) {
  Params p;
  p.z = reinterpret_cast<const void*>(a.z);
  p.n = static_cast<int>(a.n);
  p.d = static_cast<int>(a.d);
  p.sm = a.sz_m;
  p.sn = a.sz_n;
  p.sd = a.sz_d;
  p.labels = reinterpret_cast<const int*>(a.labels);
  p.theta = reinterpret_cast<const float*>(a.theta);
  p.logd = reinterpret_cast<const float*>(a.logd);
  p.w = reinterpret_cast<const float*>(a.w);
  p.inv_npos = reinterpret_cast<const float*>(a.inv_npos);
  p.w_scale = reinterpret_cast<const float*>(a.w_scale);
  p.inv_tau = static_cast<float>(a.inv_tau);
  p.kappa = static_cast<float>(a.inv_tau * kLog2e);
  p.grad = reinterpret_cast<float*>(a.grad);
  p.row_start = static_cast<int>(a.row_start);
  p.rows = static_cast<int>(rows);
  return p;
}

// True when z can be staged in 16-byte cp.async pieces (8 elements of 16 bits or 4 of 32): unit
// stride along D, D and the row / modality strides multiples of the piece, 16-byte aligned base.
inline bool vector_layout(const SupconBackwardArgs& a) {
  const long long piece = a.dtype == kFloat32 ? 4 : 8;
  return a.sz_d == 1 && a.d % piece == 0 && a.sz_n % piece == 0 && (a.m == 1 || a.sz_m % piece == 0) &&
         a.z % 16 == 0;
}

// ------------------------------------------------------------------ staging
// Stage rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of z[m] (zm) into dst[ROWS][LD]
// (element type E: the bits of z). Rows >= row_end and columns >= d become 0, so they add nothing.
// Each thread copies one 16-byte column piece of rows r, r + kRowStep, ... (copy_row / copy_col),
// walking one pointer so that no per-piece address stays live in registers.
// kVec: 16-byte cp.async pieces (needs sd == 1, d and sn multiples of the piece, 16-byte aligned z);
// otherwise scalar loads (any strides; complete before returning).
template <typename E, int ROWS, int COLS, int LD, int THREADS, bool kVec>
__device__ __forceinline__ void stage_tile(E* dst, const E* zm, const Params& p, int row0, int row_end, int col0) {
  constexpr int kPiece = 16 / sizeof(E);
  constexpr int kPerRow = COLS / kPiece;
  constexpr int kRowStep = THREADS / kPerRow;
  static_assert(THREADS % kPerRow == 0 && ROWS % kRowStep == 0, "tile must split evenly over the threads");
  static_assert(LD % kPiece == 0, "shared rows must stay 16-byte aligned");
  const int r = copy_row(threadIdx.x, 0, THREADS, COLS, kPiece), c = copy_col(threadIdx.x, 0, THREADS, COLS, kPiece);
  const int col = col0 + c;
  E* out = dst + r * LD + c;
  int row = row0 + r;
  if constexpr (kVec) {
    const E* src = zm + row * p.sn + col;
    const long long step = kRowStep * p.sn;
    const bool col_ok = col < p.d;  // d % kPiece == 0: a piece is all in or all out
#pragma unroll
    for (int e = 0; e < ROWS / kRowStep; ++e, row += kRowStep, src += step) {
      const bool ok = col_ok && row < row_end;
      cp_async16(out + e * kRowStep * LD, ok ? src : zm, ok);
    }
  } else {
#pragma unroll 1
    for (int e = 0; e < ROWS / kRowStep; ++e, row += kRowStep) {  // not unrolled: few registers
#pragma unroll
      for (int v = 0; v < kPiece; ++v)
        out[e * kRowStep * LD + v] = (row < row_end && col + v < p.d) ? zm[row * p.sn + (col + v) * p.sd] : E(0);
    }
  }
}

// ------------------------------------------------------------------ per-column constants
// Shared-memory RowCoef of a tile of rows (float4 {u, wt, pw, theta}) and labels:
// the current / next column tile, or (float32 kernel) the block's anchor rows.
template <int BN>
struct CoefTile {
  float4 coef[BN];
  int label[BN];
};

// Raw per-row values of column j, loaded early (plain 32-bit loads) and turned into RowCoef later.
struct ColRaw {
  float theta, logd, w, inv_npos;
  int label;
};

__device__ __forceinline__ ColRaw load_col_raw(const Params& p, int m, int j) {
  ColRaw r{0.f, 0.f, 0.f, 0.f, -1};  // past the end: dead column
  if (j < p.n) {
    const long long k = static_cast<long long>(m) * p.n + j;
    r = ColRaw{p.theta[k], p.logd[k], p.w[k], p.inv_npos[j], p.labels[j]};
  }
  return r;
}

template <int BN>
__device__ __forceinline__ void store_row(CoefTile<BN>& t, int c, const RowCoef<float>& k) {
  t.coef[c] = make_float4(k.u, k.wt, k.pw, k.theta);
  t.label[c] = k.label;
}

template <int BN>
__device__ __forceinline__ void store_col(CoefTile<BN>& t, int c, const ColRaw& r, float out_scale, float inv_tau) {
  store_row(t, c, row_coef<float>(r.theta, r.logd, r.w, r.inv_npos, r.label, inv_tau, out_scale));
}

template <int BN>
__device__ __forceinline__ RowCoef<float> col_coef(const CoefTile<BN>& t, int c) {
  const float4 q = t.coef[c];
  return RowCoef<float>{q.x, q.y, q.z, q.w, t.label[c]};
}

// Anchor row i: its constants, or a dead row outside [row_start, row_start + rows).
__device__ __forceinline__ RowCoef<float> anchor_coef(const Params& p, int m, int i, int i_end, float out_scale) {
  if (i >= i_end) return dead_row_coef<float>();
  return load_row_coef<float>(p.theta, p.logd, p.w, p.inv_npos, p.labels, m, i, p.n, p.inv_tau, out_scale);
}

// Output element (m, i, col) of grad [M, rows, D].
__device__ __forceinline__ float* grad_at(const Params& p, int m, int i, int col) {
  return p.grad + (static_cast<long long>(m) * p.rows + (i - p.row_start)) * p.d + col;
}

// w_scale == 0: the modality's gradient is zero; write this block's rows x columns [c0, c1).
__device__ __forceinline__ void write_zero_block(const Params& p, int m, int i0, int bm, int c0, int c1) {
  const int i_end = min(i0 + bm, p.row_start + p.rows), cols = min(c1, p.d) - c0;
  for (int e = threadIdx.x; e < bm * cols; e += blockDim.x) {
    const int i = i0 + e / cols;
    if (i < i_end) *grad_at(p, m, i, c0 + e % cols) = 0.f;
  }
}

#if !defined(MCNCL_SUPCON_SIM)
// ------------------------------------------------------------------ launchers (CUDA builds)
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the caller gets an exception, the next call a clean state
    throw std::runtime_error(std::string("supcon_backward_cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

// supcon_mma.cu / supcon_simt.cu; `vec`: the cp.async kernels (vector_layout), else the scalar ones.
void launch_supcon_mma(const Params& p, int m, bool bf16, bool vec, cudaStream_t stream);
void launch_supcon_simt(const Params& p, int m, bool vec, cudaStream_t stream);
#endif

}  // namespace supcon
}  // namespace mcncl
