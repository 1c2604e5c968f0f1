// CUDA backward of the hard-negative SupCon loss: dL/dz'_i = sum_j (G_ij + G_ji) z'_j
// (derivation of G in supcon_math.h, which holds all per-element math shared with the host code).
//
// One block = 64 anchor rows x one chunk of output columns x one modality. For every 64-column
// tile J: S = Z_I Z_J^T is recomputed from shared-memory tiles (K chunks), A = G_IJ + G_JI^T is
// formed element-wise from S and the per-row values, and dZ_I[:, chunk] += A Z_J[:, chunk].
// Nothing of size N x N is stored. float32 accumulation everywhere, on the caller's stream.
//  * float16 / bfloat16: WMMA tensor cores (16x16x16), 4 warps, each warp owns 16 rows;
//    A is staged in 16 bits scaled by 1 / w_scale (w ~ 1/N would underflow float16).
//  * float32: SIMT FMA (IEEE, parity rel < 1e-5 with the reference; tf32 would not meet it),
//    256 threads with 4x4 register micro-tiles.
// Shared memory is static and below 48 KiB per block (no opt-in needed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#include "supcon_api.h"
#include "supcon_math.h"

namespace mcncl {
namespace {

using supcon::RowStats;

constexpr int kBM = 64;  // anchor rows per block
constexpr int kBN = 64;  // columns per tile

struct Params {
  const void* z;
  long long m, n, d, sm, sn, sd;
  const int* labels;
  const float* theta;
  const float* logd;
  const float* w;
  const float* inv_npos;
  const float* w_scale;
  float inv_tau;
  float* grad;               // [M, rows, D]
  long long row_start, rows; // anchor rows [row_start, row_start + rows) of z
};

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Row values of row `row` of modality m; rows past the end get w = 0 and never contribute.
__device__ __forceinline__ RowStats row_stats(const Params& p, long long m, long long row) {
  if (row < p.n) return supcon::load_row(p.theta, p.logd, p.w, p.inv_npos, p.labels, m, row, p.n);
  RowStats r;
  r.theta = 0.f; r.logd = 0.f; r.w = 0.f; r.inv_npos = 0.f; r.label = -1;
  return r;
}

// z[m, row, col] as T, zero outside [0, n) x [0, d).
template <typename T>
__device__ __forceinline__ T load_z(const Params& p, long long m, long long row, long long col) {
  if (row >= p.n || col >= p.d) return from_float<T>(0.f);
  return static_cast<const T*>(p.z)[supcon::offset3(m, row, col, p.sm, p.sn, p.sd)];
}

// ------------------------------------------------------------------ float16 / bfloat16 (WMMA)
namespace wmma = nvcuda::wmma;
constexpr int kWarps = 4;
constexpr int kKC = 64;    // K chunk of the similarity GEMM
constexpr int kDO = 128;   // output columns per block
constexpr int kLdK = kKC + 8, kLdO = kDO + 8, kLdS = kBN + 4, kLdA = kBN + 8;

template <typename T>
struct WmmaShared {
  union Stage {
    struct { T zi[kBM * kLdK]; T zj[kBN * kLdK]; } k;
    T zo[kBN * kLdO];
  };
  __align__(128) Stage stage;
  __align__(128) float s[kBM * kLdS];
  __align__(128) T a[kBM * kLdA];
  RowStats ri[kBM];
  RowStats rj[kBN];
};

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) supcon_backward_wmma(Params p) {
  __shared__ WmmaShared<T> sh;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long i0 = p.row_start + static_cast<long long>(blockIdx.x) * kBM;
  const long long i_end = p.row_start + p.rows;
  const long long c0 = static_cast<long long>(blockIdx.y) * kDO;
  const long long m = blockIdx.z;
  const float scale = p.w_scale[m];
  if (scale == 0.f) {  // zero upstream gradient: write zeros
    for (int e = tid; e < kBM * kDO; e += blockDim.x) {
      const long long i = i0 + e / kDO, c = c0 + e % kDO;
      if (i < i_end && c < p.d) p.grad[(m * p.rows + i - p.row_start) * p.d + c] = 0.f;
    }
    return;
  }
  const float inv_scale = 1.f / scale;
  for (int r = tid; r < kBM; r += blockDim.x) sh.ri[r] = row_stats(p, m, i0 + r);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kDO / 16];
#pragma unroll
  for (int t = 0; t < kDO / 16; ++t) wmma::fill_fragment(acc[t], 0.f);

  for (long long j0 = 0; j0 < p.n; j0 += kBN) {
    for (int r = tid; r < kBN; r += blockDim.x) sh.rj[r] = row_stats(p, m, j0 + r);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[kBN / 16];
#pragma unroll
    for (int t = 0; t < kBN / 16; ++t) wmma::fill_fragment(s[t], 0.f);
    for (long long k0 = 0; k0 < p.d; k0 += kKC) {
      __syncthreads();  // previous readers of the stage are done
      for (int e = tid; e < kBM * kKC; e += blockDim.x) {
        const int r = e / kKC, k = e % kKC;
        sh.stage.k.zi[r * kLdK + k] = load_z<T>(p, m, i0 + r, k0 + k);
        sh.stage.k.zj[r * kLdK + k] = load_z<T>(p, m, j0 + r, k0 + k);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kKC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sh.stage.k.zi[(warp * 16) * kLdK + kk], kLdK);
#pragma unroll
        for (int t = 0; t < kBN / 16; ++t) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // Z_J^T
          wmma::load_matrix_sync(fb, &sh.stage.k.zj[(t * 16) * kLdK + kk], kLdK);
          wmma::mma_sync(s[t], fa, fb, s[t]);
        }
      }
    }
    // A = G_IJ + G_JI^T for this warp's 16 rows, staged as T scaled by 1 / w_scale
    float* srow = &sh.s[(warp * 16) * kLdS];
#pragma unroll
    for (int t = 0; t < kBN / 16; ++t) wmma::store_matrix_sync(srow + t * 16, s[t], kLdS, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * kBN; e += 32) {
      const int r = warp * 16 + e / kBN, c = e % kBN;
      const long long i = i0 + r, j = j0 + c;
      float a = 0.f;
      if (i < p.n && j < p.n)
        a = supcon::pair_coeff<float>(sh.s[r * kLdS + c], i, j, sh.ri[r], sh.rj[c], p.inv_tau) * inv_scale;
      sh.a[r * kLdA + c] = from_float<T>(a);
    }
    __syncthreads();  // all warps are done with the K stage: reuse it for Z_J[:, chunk]
    for (int e = tid; e < kBN * kDO; e += blockDim.x) {
      const int r = e / kDO, c = e % kDO;
      sh.stage.zo[r * kLdO + c] = load_z<T>(p, m, j0 + r, c0 + c);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &sh.a[(warp * 16) * kLdA + kk], kLdA);
#pragma unroll
      for (int t = 0; t < kDO / 16; ++t) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &sh.stage.zo[kk * kLdO + t * 16], kLdO);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
  }
  // write dZ_I[:, chunk] * w_scale through this warp's rows of the S buffer (64 columns at a time)
  float* srow = &sh.s[(warp * 16) * kLdS];
#pragma unroll
  for (int half = 0; half < kDO / kBN; ++half) {
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kBN / 16; ++t)
      wmma::store_matrix_sync(srow + t * 16, acc[half * (kBN / 16) + t], kLdS, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * kBN; e += 32) {
      const int r = e / kBN, c = e % kBN;
      const long long i = i0 + warp * 16 + r, col = c0 + half * kBN + c;
      if (i < i_end && col < p.d) p.grad[(m * p.rows + i - p.row_start) * p.d + col] = srow[r * kLdS + c] * scale;
    }
  }
}

// ------------------------------------------------------------------ float32 (SIMT, IEEE FMA)
constexpr int kThreads32 = 256;
constexpr int kKC32 = 32, kDO32 = 64;
constexpr int kLd32 = kBM + 4, kLdO32 = kDO32 + 4, kLdA32 = kBN + 1;

struct Fp32Shared {
  union Stage {
    struct { float zi[kKC32 * kLd32]; float zj[kKC32 * kLd32]; } k;  // [k][row]
    float zo[kBN * kLdO32];                                           // [j][col]
  };
  Stage stage;
  float a[kBM * kLdA32];
  RowStats ri[kBM];
  RowStats rj[kBN];
};

__global__ void __launch_bounds__(kThreads32) supcon_backward_fp32(Params p) {
  __shared__ Fp32Shared sh;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;  // rows ty + 16a, columns tx + 16b
  const long long i0 = p.row_start + static_cast<long long>(blockIdx.x) * kBM;
  const long long i_end = p.row_start + p.rows;
  const long long c0 = static_cast<long long>(blockIdx.y) * kDO32;
  const long long m = blockIdx.z;
  for (int r = tid; r < kBM; r += kThreads32) sh.ri[r] = row_stats(p, m, i0 + r);
  float out[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) out[a][b] = 0.f;

  for (long long j0 = 0; j0 < p.n; j0 += kBN) {
    for (int r = tid; r < kBN; r += kThreads32) sh.rj[r] = row_stats(p, m, j0 + r);
    float s[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
    for (long long k0 = 0; k0 < p.d; k0 += kKC32) {
      __syncthreads();
      for (int e = tid; e < kBM * kKC32; e += kThreads32) {
        const int r = e / kKC32, k = e % kKC32;
        sh.stage.k.zi[k * kLd32 + r] = load_z<float>(p, m, i0 + r, k0 + k);
        sh.stage.k.zj[k * kLd32 + r] = load_z<float>(p, m, j0 + r, k0 + k);
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kKC32; ++k) {
        float zi[4], zj[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) zi[a] = sh.stage.k.zi[k * kLd32 + ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) zj[b] = sh.stage.k.zj[k * kLd32 + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) s[a][b] = fmaf(zi[a], zj[b], s[a][b]);
      }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int r = ty + 16 * a, c = tx + 16 * b;
        const long long i = i0 + r, j = j0 + c;
        sh.a[r * kLdA32 + c] =
            (i < p.n && j < p.n) ? supcon::pair_coeff<float>(s[a][b], i, j, sh.ri[r], sh.rj[c], p.inv_tau) : 0.f;
      }
    __syncthreads();  // stage free, A complete
    for (int e = tid; e < kBN * kDO32; e += kThreads32) {
      const int r = e / kDO32, c = e % kDO32;
      sh.stage.zo[r * kLdO32 + c] = load_z<float>(p, m, j0 + r, c0 + c);
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kBN; ++j) {
      float av[4], zv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) av[a] = sh.a[(ty + 16 * a) * kLdA32 + j];
#pragma unroll
      for (int b = 0; b < 4; ++b) zv[b] = sh.stage.zo[j * kLdO32 + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) out[a][b] = fmaf(av[a], zv[b], out[a][b]);
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const long long i = i0 + ty + 16 * a, col = c0 + tx + 16 * b;
      if (i < i_end && col < p.d) p.grad[(m * p.rows + i - p.row_start) * p.d + col] = out[a][b];
    }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("supcon_backward_cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

void supcon_backward_cuda(const SupconBackwardArgs& a, std::uintptr_t stream_handle) {
  if (a.m < 0 || a.n < 0 || a.d < 0) throw std::invalid_argument("supcon_backward_cuda: negative size");
  const long long rows = supcon_row_count(a, "supcon_backward_cuda");
  if (a.m == 0 || rows == 0 || a.d == 0) return;
  Params p;
  p.z = reinterpret_cast<const void*>(a.z);
  p.m = a.m; p.n = a.n; p.d = a.d; p.sm = a.sz_m; p.sn = a.sz_n; p.sd = a.sz_d;
  p.labels = reinterpret_cast<const int*>(a.labels);
  p.theta = reinterpret_cast<const float*>(a.theta);
  p.logd = reinterpret_cast<const float*>(a.logd);
  p.w = reinterpret_cast<const float*>(a.w);
  p.inv_npos = reinterpret_cast<const float*>(a.inv_npos);
  p.w_scale = reinterpret_cast<const float*>(a.w_scale);
  p.inv_tau = static_cast<float>(a.inv_tau);
  p.grad = reinterpret_cast<float*>(a.grad);
  p.row_start = a.row_start;
  p.rows = rows;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const unsigned row_blocks = static_cast<unsigned>((rows + kBM - 1) / kBM);
  if (a.m > 65535) throw std::invalid_argument("supcon_backward_cuda: at most 65535 modalities");
  switch (a.dtype) {
    case kFloat32: {
      dim3 grid(row_blocks, static_cast<unsigned>((a.d + kDO32 - 1) / kDO32), static_cast<unsigned>(a.m));
      supcon_backward_fp32<<<grid, kThreads32, 0, stream>>>(p);
      break;
    }
    case kFloat16: {
      dim3 grid(row_blocks, static_cast<unsigned>((a.d + kDO - 1) / kDO), static_cast<unsigned>(a.m));
      supcon_backward_wmma<__half><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    }
    case kBFloat16: {
      dim3 grid(row_blocks, static_cast<unsigned>((a.d + kDO - 1) / kDO), static_cast<unsigned>(a.m));
      supcon_backward_wmma<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    }
    default:
      throw std::invalid_argument("supcon_backward_cuda: z must be float32, float16 or bfloat16 (dtype code " +
                                  std::to_string(a.dtype) + ")");
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace mcncl
