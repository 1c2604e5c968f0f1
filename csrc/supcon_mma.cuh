// float16 / bfloat16 SupCon backward on tensor cores: mma.sync.m16n8k16, float32 accumulation.
//
// A block owns 64 anchor rows I (4 warps x 16 rows) and one 128-wide chunk of output columns of D,
// for one modality. Per 64-column tile J (the math of supcon_math.h):
//   S   = Z_I Z_J^T            ldmatrix from shared memory -> mma, S in registers (16 x 64 per warp)
//   A   = G_IJ + G_JI^T        element-wise in the same registers, then packed to 16 bits (A / w_scale)
//   dZ_I += A Z_J[:, chunk]    the packed S registers are the A operand (no shared-memory round trip)
// Shared memory: Z_I stays resident (one chunk of D) for the whole column loop when D <= 128; Z_J is
// staged once per tile by 16-byte cp.async into two buffers, so tile t+1 loads while tile t computes,
// and the same buffer feeds both GEMMs. For D > 128 every (tile, D-chunk) is one pipeline step with
// Z_I's chunk streamed next to Z_J's, and the block's own output chunk comes last (stage_plan).
// Layouts that cp.async cannot read (sd != 1, D or the row stride not a multiple of 8, z not
// 16-byte aligned) use the same kernel with scalar loads (`_scalar` entry points).
// Kernel body; the entry points are in supcon_mma.cu, the CPU simulation in sim/.
#pragma once

#include "supcon_device.cuh"

namespace mcncl {
namespace supcon {
namespace mma {

constexpr int kThreads = 128;     // 4 warps, warp w owns anchor rows 16 w .. 16 w + 15
constexpr int kBM = 64;           // anchor rows per block
constexpr int kBN = 64;           // columns per tile
constexpr int kLd = kChunkD + 8;  // shared row stride in elements: 272 bytes, ldmatrix rows hit distinct banks
constexpr int kTile = kBM * kLd;  // one staged 64 x 128 tile (Z_I or Z_J), 16-bit elements
static_assert(kBM == kBN, "Z_I and Z_J tiles share one shape");
constexpr int kMinBlocks = 3;     // blocks per SM the register budget must allow (<= 168 registers)

// Dynamic shared memory: CoefTile[2] | Z_J[2] | Z_I[1] (resident) or Z_I[2] (streamed with Z_J).
constexpr size_t kColBytes = 2 * sizeof(CoefTile<kBN>);
constexpr size_t smem_bytes(bool stream_zi) {
  return kColBytes + (2 + (stream_zi ? 2 : 1)) * kTile * sizeof(uint16_t);
}
// cp.async and ldmatrix need 16-byte aligned shared addresses: every region and row starts on one
static_assert(kColBytes % 16 == 0 && kTile * sizeof(uint16_t) % 16 == 0 && kLd * sizeof(uint16_t) % 16 == 0,
              "16-byte aligned shared regions");

// Grid: anchor-row blocks x D-chunks x modalities.
inline LaunchShape mma_shape(const Params& p, int m) {
  const int nchunks = ceil_div(p.d, kChunkD);
  return LaunchShape{static_cast<unsigned>(ceil_div(p.rows, kBM)), static_cast<unsigned>(nchunks),
                     static_cast<unsigned>(m), kThreads, smem_bytes(nchunks > 1)};
}

template <bool kBF16, bool kVec>
__device__ __forceinline__ void mma_backward(const Params& p) {
  unsigned char* smem = dynamic_smem();
  CoefTile<kBN>* cols = reinterpret_cast<CoefTile<kBN>*>(smem);      // [2]: constants of tiles t, t+1
  uint16_t* zj = reinterpret_cast<uint16_t*>(smem + kColBytes);     // [2][kTile]
  uint16_t* zi = zj + 2 * kTile;                                    // [1 or 2][kTile]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int m = blockIdx.z, out_chunk = blockIdx.y, nchunks = gridDim.y;
  const int i0 = p.row_start + blockIdx.x * kBM, i_end = p.row_start + p.rows;
  const int c0 = out_chunk * kChunkD;
  const float scale = p.w_scale[m];
  if (scale == 0.f) {  // zero upstream gradient for this modality
    write_zero_block(p, m, i0, kBM, c0, c0 + kChunkD);
    return;
  }
  const float inv_scale = 1.f / scale;  // A is staged as A / w_scale: w ~ 1/N would underflow float16
  const uint16_t* zm = static_cast<const uint16_t*>(p.z) + m * p.sm;
  const bool stream_zi = nchunks > 1;
  const int steps = ceil_div(p.n, kBN) * nchunks;

  // This thread's anchor rows: accumulator rows g and g + 8 of its warp's 16 (mma_c_row).
  const int ra = warp * 16 + mma_c_row(lane, 0);
  const RowCoef<float> rc[2] = {anchor_coef(p, m, i0 + ra, i_end, inv_scale),
                                anchor_coef(p, m, i0 + ra + 8, i_end, inv_scale)};

  // A step stages Z_J[tile, chunk] (and Z_I[:, chunk] when streamed) into buffer t % 2.
  auto issue = [&](const StagePlan& sp, int buf) {
    const int k0 = sp.chunk * kChunkD;
    stage_tile<uint16_t, kBN, kChunkD, kLd, kThreads, kVec>(zj + buf * kTile, zm, p, sp.tile * kBN, p.n, k0);
    if (stream_zi) stage_tile<uint16_t, kBM, kChunkD, kLd, kThreads, kVec>(zi + buf * kTile, zm, p, i0, i_end, k0);
  };
  StagePlan sp = stage_plan(0, nchunks, out_chunk);
  if (!stream_zi) stage_tile<uint16_t, kBM, kChunkD, kLd, kThreads, kVec>(zi, zm, p, i0, i_end, 0);  // resident
  issue(sp, 0);
  cp_async_commit();
  if (threadIdx.x < kBN) store_col(cols[0], threadIdx.x, load_col_raw(p, m, threadIdx.x), inv_scale, p.inv_tau);

  float acc[kChunkD / 8][4] = {};  // dZ_I: this warp's 16 rows x the output chunk, as n8 tiles
  float s[kBN / 8][4];             // S, then A: 16 rows x 64 columns, as n8 tiles
  ColRaw next{};                   // the next tile's column values, loaded while this tile computes
  // per-lane ldmatrix offsets (elements) into a staged tile
  const int lda = (warp * 16 + ldsm_a_row(lane)) * kLd + ldsm_a_col(lane);
  const int ldbn = ldsm_bn_row(lane) * kLd + ldsm_bn_col(lane);
  const int ldbt = ldsm_bt_row(lane) * kLd + ldsm_bt_col(lane);

  for (int t = 0; t < steps; ++t) {
    const int j0 = sp.tile * kBN;
    const CoefTile<kBN>& ct = cols[sp.tile & 1];
    const uint16_t* zj_t = zj + (t & 1) * kTile;
    const uint16_t* zi_t = zi + (stream_zi ? (t & 1) * kTile : 0);
    cp_async_wait_all();
    __syncthreads();  // step t's tiles and constants are visible; nobody still reads step t-1's buffers
    const StagePlan np1 = next_stage(sp, nchunks, out_chunk);
    if (t + 1 < steps) issue(np1, (t + 1) & 1);  // in flight during this step's math
    cp_async_commit();

    if (sp.first) {
      if (threadIdx.x < kBN) next = load_col_raw(p, m, j0 + kBN + threadIdx.x);
      // S starts at the candidate bias: 0, or NaN for ignored / out-of-range columns (supcon_math.h)
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = candidate_bias<float>(ct.label[8 * nt + mma_c_col(lane, e)]);
    }

    // S += Z_I[:, chunk] Z_J[:, chunk]^T, one 16-wide k-step at a time
    auto s_step = [&](int ks) {
      unsigned a[4];
      ldsm_x4(a, zi_t + lda + ks * 16);
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        unsigned b[4];
        ldsm_x4(b, zj_t + ldbn + np * 16 * kLd + ks * 16);
        mma16816<kBF16>(s[2 * np], a, b[0], b[1]);
        mma16816<kBF16>(s[2 * np + 1], a, b[2], b[3]);
      }
    };
    const int ksteps = chunk_steps(p.d, sp.chunk, kChunkD, 16);
    if (ksteps == kChunkD / 16) {  // a full chunk: unrolled
#pragma unroll
      for (int ks = 0; ks < kChunkD / 16; ++ks) s_step(ks);
    } else {  // the partial last chunk of D: only its k-steps
#pragma unroll 1
      for (int ks = 0; ks < ksteps; ++ks) s_step(ks);
    }
    if (sp.last) {
      // Per k-step kk (columns 16 kk .. 16 kk + 15 of the tile): A = (G_IJ + G_JI^T) / w_scale from the
      // S registers (zero on the diagonal), packed into the 16-bit A operand, then
      // dZ_I[:, out chunk] += A Z_J[16 kk.., out chunk] from this step's buffer (the output chunk).
      // Interleaving keeps few values live and overlaps the exp2 work with the tensor cores. A partial
      // last chunk of D also multiplies its zero-filled padding columns (no branches in the hot loop).
      const bool diag = tile_has_diagonal(i0, kBM, j0, kBN);
      const int row_minus_col = i0 + warp * 16 - j0;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        unsigned af[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int nt = s_to_a_tile(kk, r);
          float v[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int e = s_to_a_elem(r, h), col = 8 * nt + mma_c_col(lane, e);
            v[h] = pair_coeff<float>(s[nt][e], rc[e >> 1], col_coef(ct, col), p.kappa);
            if (diag && mma_c_row(lane, e) + row_minus_col == col) v[h] = 0.f;
          }
          af[r] = pack16<kBF16>(v[0], v[1]);
        }
#pragma unroll
        for (int np = 0; np < kChunkD / 16; ++np) {
          unsigned b[4];
          ldsm_x4_trans(b, zj_t + ldbt + kk * 16 * kLd + np * 16);
          mma16816<kBF16>(acc[2 * np], af, b[0], b[1]);
          mma16816<kBF16>(acc[2 * np + 1], af, b[2], b[3]);
        }
      }
      // constants of the next tile into the other buffer (read after the next step's barrier)
      if (threadIdx.x < kBN) store_col(cols[(sp.tile + 1) & 1], threadIdx.x, next, inv_scale, p.inv_tau);
    }
    sp = np1;
  }

  // grad = dZ_I * w_scale; rows outside the range are skipped, ignored anchors get exact zeros
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = i0 + ra + 8 * h;
    if (i >= i_end) continue;
    const bool live = is_live(rc[h].label);
    float* out = grad_at(p, m, i, 0);
#pragma unroll
    for (int nt = 0; nt < kChunkD / 8; ++nt) {
      const int col = c0 + 8 * nt + mma_c_col(lane, 0);
      const float v0 = live ? acc[nt][2 * h] * scale : 0.f, v1 = live ? acc[nt][2 * h + 1] * scale : 0.f;
      if constexpr (kVec) {  // d % 8 == 0: both columns valid or neither; 8-byte aligned
        if (col < p.d) *reinterpret_cast<float2*>(out + col) = make_float2(v0, v1);
      } else {
        if (col < p.d) out[col] = v0;
        if (col + 1 < p.d) out[col + 1] = v1;
      }
    }
  }
}

}  // namespace mma
}  // namespace supcon
}  // namespace mcncl
