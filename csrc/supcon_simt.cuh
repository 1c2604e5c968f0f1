// float32 SupCon backward with SIMT FMA (IEEE fmaf, float32 accumulation: parity rel < 1e-5 with the
// float64 reference; tf32 tensor cores would not meet it).
//
// Same streaming structure as supcon_mma.cuh: a block owns 64 anchor rows and one 128-wide chunk of
// output columns; Z_I stays resident in shared memory (D <= 128) or is streamed chunk by chunk next
// to Z_J; Z_J is staged once per 32-column tile by 16-byte cp.async into two buffers (tile t+1 loads
// while tile t computes) and feeds both products:
//   S = Z_I Z_J^T (registers) -> A = G_IJ + G_JI^T (shared, 64 x 32) -> dZ_I += A Z_J[:, chunk] (registers)
// 256 threads as 16 x 16: thread (tx, ty) holds S rows ty + 16 a, columns tx + 16 b, and dZ rows
// ty + 16 a, columns 4 tx + 64 b + 0..3 (a < 4, b < 2). Shared reads are float4.
// Kernel body; the entry points are in supcon_simt.cu, the CPU simulation in sim/.
#pragma once

#include "supcon_device.cuh"

namespace mcncl {
namespace supcon {
namespace simt {

constexpr int kThreads = 256;
constexpr int kBM = 64;            // anchor rows per block
constexpr int kBN = 32;            // columns per tile
constexpr int kLd = kChunkD + 4;   // 132 floats: 16-byte aligned rows, 4 banks apart
constexpr int kLdA = kBN + 4;      // A tile row stride
constexpr int kTileI = kBM * kLd, kTileJ = kBN * kLd;

// Dynamic shared memory: CoefTile[2] | anchor-row constants | A | Z_J[2] | Z_I[1] (resident) or Z_I[2]
// (streamed). The anchor rows' constants live in shared memory, not registers (4 rows per thread).
constexpr size_t kColBytes = 2 * sizeof(CoefTile<kBN>) + sizeof(CoefTile<kBM>);
constexpr size_t kABytes = kBM * kLdA * sizeof(float);
constexpr size_t smem_bytes(bool stream_zi) {
  return kColBytes + kABytes + (2 * kTileJ + (stream_zi ? 2 : 1) * kTileI) * sizeof(float);
}
// cp.async and float4 accesses need 16-byte aligned shared addresses: every region and row starts on one
static_assert(kColBytes % 16 == 0 && kABytes % 16 == 0 && kLdA % 4 == 0 && kLd % 4 == 0 &&
                  sizeof(CoefTile<kBN>) % 16 == 0,
              "16-byte aligned shared regions");

// Grid: anchor-row blocks x D-chunks x modalities.
inline LaunchShape simt_shape(const Params& p, int m) {
  const int nchunks = ceil_div(p.d, kChunkD);
  return LaunchShape{static_cast<unsigned>(ceil_div(p.rows, kBM)), static_cast<unsigned>(nchunks),
                     static_cast<unsigned>(m), kThreads, smem_bytes(nchunks > 1)};
}

template <bool kVec>
__device__ __forceinline__ void simt_backward(const Params& p) {
  unsigned char* smem = dynamic_smem();
  CoefTile<kBN>* cols = reinterpret_cast<CoefTile<kBN>*>(smem);               // [2]
  CoefTile<kBM>& rows = *reinterpret_cast<CoefTile<kBM>*>(smem + 2 * sizeof(CoefTile<kBN>));
  float* a_s = reinterpret_cast<float*>(smem + kColBytes);                   // [kBM][kLdA]
  float* zj = reinterpret_cast<float*>(smem + kColBytes + kABytes);          // [2][kTileJ]
  float* zi = zj + 2 * kTileJ;                                               // [1 or 2][kTileI]

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int m = blockIdx.z, out_chunk = blockIdx.y, nchunks = gridDim.y;
  const int i0 = p.row_start + blockIdx.x * kBM, i_end = p.row_start + p.rows;
  const int c0 = out_chunk * kChunkD;
  if (p.w_scale[m] == 0.f) {  // zero upstream gradient for this modality
    write_zero_block(p, m, i0, kBM, c0, c0 + kChunkD);
    return;
  }
  const float* zm = static_cast<const float*>(p.z) + m * p.sm;
  const bool stream_zi = nchunks > 1;
  const int steps = ceil_div(p.n, kBN) * nchunks;

  if (threadIdx.x < kBM) store_row(rows, threadIdx.x, anchor_coef(p, m, i0 + threadIdx.x, i_end, 1.f));

  auto issue = [&](const StagePlan& sp, int buf) {  // Z_J[tile, chunk] (and Z_I[:, chunk]) into buffer buf
    const int k0 = sp.chunk * kChunkD;
    stage_tile<float, kBN, kChunkD, kLd, kThreads, kVec>(zj + buf * kTileJ, zm, p, sp.tile * kBN, p.n, k0);
    if (stream_zi) stage_tile<float, kBM, kChunkD, kLd, kThreads, kVec>(zi + buf * kTileI, zm, p, i0, i_end, k0);
  };
  StagePlan sp = stage_plan(0, nchunks, out_chunk);
  if (!stream_zi) stage_tile<float, kBM, kChunkD, kLd, kThreads, kVec>(zi, zm, p, i0, i_end, 0);  // resident
  issue(sp, 0);
  cp_async_commit();
  if (threadIdx.x < kBN) store_col(cols[0], threadIdx.x, load_col_raw(p, m, threadIdx.x), 1.f, p.inv_tau);

  float out[4][8] = {};  // dZ_I rows ty + 16 a, columns 4 tx + 64 (e / 4) + e % 4 of the chunk
  float s[4][2];         // S rows ty + 16 a, columns tx + 16 b of the tile
  ColRaw next{};

  for (int t = 0; t < steps; ++t) {
    const int j0 = sp.tile * kBN;
    const CoefTile<kBN>& ct = cols[sp.tile & 1];
    const float* zj_t = zj + (t & 1) * kTileJ;
    const float* zi_t = zi + (stream_zi ? (t & 1) * kTileI : 0);
    cp_async_wait_all();
    __syncthreads();  // step t's tiles and constants visible; step t-1's readers (A included) are done
    const StagePlan np1 = next_stage(sp, nchunks, out_chunk);
    if (t + 1 < steps) issue(np1, (t + 1) & 1);
    cp_async_commit();

    if (sp.first) {
      if (threadIdx.x < kBN) next = load_col_raw(p, m, j0 + kBN + threadIdx.x);
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) s[a][b] = candidate_bias<float>(ct.label[tx + 16 * b]);  // 0 or NaN
    }

    // S += Z_I[:, chunk] Z_J[:, chunk]^T, k ascending, 4 at a time
    const int k4steps = chunk_steps(p.d, sp.chunk, kChunkD, 4);
#pragma unroll 2
    for (int k4 = 0; k4 < k4steps; ++k4) {
      float4 zi4[4], zj4[2];
#pragma unroll
      for (int a = 0; a < 4; ++a) zi4[a] = *reinterpret_cast<const float4*>(zi_t + (ty + 16 * a) * kLd + 4 * k4);
#pragma unroll
      for (int b = 0; b < 2; ++b) zj4[b] = *reinterpret_cast<const float4*>(zj_t + (tx + 16 * b) * kLd + 4 * k4);
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          s[a][b] = fmaf(zi4[a].x, zj4[b].x, s[a][b]);
          s[a][b] = fmaf(zi4[a].y, zj4[b].y, s[a][b]);
          s[a][b] = fmaf(zi4[a].z, zj4[b].z, s[a][b]);
          s[a][b] = fmaf(zi4[a].w, zj4[b].w, s[a][b]);
        }
    }
    if (sp.last) {
      // A = G_IJ + G_JI^T into shared memory (zero on the diagonal)
      const bool diag = tile_has_diagonal(i0, kBM, j0, kBN);
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const RowCoef<float> cj = col_coef(ct, tx + 16 * b);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const float v = pair_coeff<float>(s[a][b], col_coef(rows, ty + 16 * a), cj, p.kappa);
          const bool on_diag = diag && i0 + ty + 16 * a == j0 + tx + 16 * b;
          a_s[(ty + 16 * a) * kLdA + tx + 16 * b] = on_diag ? 0.f : v;
        }
      }
      __syncthreads();  // A complete

      // dZ_I[:, out chunk] += A Z_J[:, out chunk], j ascending (this step's buffer is the output chunk)
#pragma unroll 2
      for (int j = 0; j < kBN; j += 4) {
        float4 av[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) av[a] = *reinterpret_cast<const float4*>(a_s + (ty + 16 * a) * kLdA + j);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          float4 zv[2];
#pragma unroll
          for (int b = 0; b < 2; ++b) zv[b] = *reinterpret_cast<const float4*>(zj_t + (j + jj) * kLd + 4 * tx + 64 * b);
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            const float x = jj == 0 ? av[a].x : jj == 1 ? av[a].y : jj == 2 ? av[a].z : av[a].w;
#pragma unroll
            for (int b = 0; b < 2; ++b) {
              out[a][4 * b + 0] = fmaf(x, zv[b].x, out[a][4 * b + 0]);
              out[a][4 * b + 1] = fmaf(x, zv[b].y, out[a][4 * b + 1]);
              out[a][4 * b + 2] = fmaf(x, zv[b].z, out[a][4 * b + 2]);
              out[a][4 * b + 3] = fmaf(x, zv[b].w, out[a][4 * b + 3]);
            }
          }
        }
      }
      if (threadIdx.x < kBN) store_col(cols[(sp.tile + 1) & 1], threadIdx.x, next, 1.f, p.inv_tau);
    }
    sp = np1;
  }

  // grad rows of the range; ignored anchors get exact zeros
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = i0 + ty + 16 * a;
    if (i >= i_end) continue;
    const bool live = is_live(rows.label[ty + 16 * a]);
    float* row = grad_at(p, m, i, 0);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int col = c0 + 4 * tx + 64 * b;
      const float4 v = live ? make_float4(out[a][4 * b], out[a][4 * b + 1], out[a][4 * b + 2], out[a][4 * b + 3])
                            : make_float4(0.f, 0.f, 0.f, 0.f);
      if constexpr (kVec) {  // d % 4 == 0: 16-byte aligned, all four columns valid or none
        if (col < p.d) *reinterpret_cast<float4*>(row + col) = v;
      } else {
        if (col < p.d) row[col] = v.x;
        if (col + 1 < p.d) row[col + 1] = v.y;
        if (col + 2 < p.d) row[col + 2] = v.z;
        if (col + 3 < p.d) row[col + 3] = v.w;
      }
    }
  }
}

}  // namespace simt
}  // namespace supcon
}  // namespace mcncl
