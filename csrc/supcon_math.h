// Per-element math and tile/fragment index helpers of the hard-negative SupCon backward
// (DESIGN.md §4.3), written once and used by the CUDA kernels (supcon_mma.cuh, supcon_simt.cuh), the
// host implementation (supcon_host.cpp) and the host-side layout self-check (supcon_layout_check.cpp),
// so the CPU tests exercise exactly the code the GPU runs.
//
// Derivation of G. For one modality, with z' the normalised embeddings, s_ij = <z'_i, z'_j>,
// tau the temperature, P_i the positives of anchor i, H_i its hard negatives and
//   D_i = sum_{j in H_i ∪ P_i} exp(s_ij / tau),
//   l_i = log D_i - (1/|P_i|) sum_{p in P_i} s_ip / tau,
//   L   = (1/A) sum_{i : |P_i| > 0} l_i            (A = number of anchors with a positive),
// the selection (H_i) is not differentiated, so
//   dL/ds_ij = G_ij = w_i * ( [j in H_i ∪ P_i] exp(s_ij/tau - log D_i) / tau - [j in P_i] / (|P_i| tau) )
// with w_i = g / A for anchors with a positive (g: upstream gradient of this modality's loss) and
// w_i = 0 otherwise. G_ii = 0 (i is neither its own positive nor a negative).
// Ignored rows carry label < 0: they are neither anchors (w = 0, set by the caller) nor candidates
// of any anchor (G_ij = 0 when label_j < 0), so they neither receive nor contribute gradient.
// Since s_ij depends on z'_i through both s_ij and s_ji,
//   dL/dz'_i = sum_j (G_ij + G_ji) z'_j .
// A_ij = G_ij + G_ji is symmetric and is computed per tile from s_ij and the per-row values
// (theta, log D, w, 1/|P|, label) of i and j; then dZ'_I += A_IJ Z'_J.
//
// Hard-negative test: the forward saves, per row, a threshold theta_i in (t_i^-, t_i], where t_i is
// the k_i-th largest negative similarity and t_i^- the largest negative similarity below t_i
// (theta_i = -inf when every negative is hard, +inf when there is none). On the similarities the
// forward computed, {s >= theta_i} = {s >= t_i} exactly (ties at t_i included); a backward that
// recomputes s_ij with a different summation order still classifies every element unless the
// rounding difference exceeds half the gap below t_i.
//
// Branch-free form used by every implementation (selects, no data-dependent branches):
//   exp(s/tau - log D_i) = exp2(s * kappa - u_i),  kappa = log2(e) / tau,  u_i = log2(e) log D_i
//   G_ij / out_scale = [same || s >= theta_i] * (exp2(s kappa - u_i) wt_i - [same] pw_i)
// with wt_i = w_i out_scale / tau, pw_i = wt_i / |P_i| (RowCoef). Rows with w_i = 0 get u = theta = +inf
// and pw = 0, so their G row is exactly 0 whatever the caller left in theta / log D (NaN included).
// A candidate j with label < 0 (ignored, or past the end of the tile) has s replaced by s + NaN
// (candidate_bias): every comparison fails and, its label differing from every live label, it adds 0.
// Anchor rows with label < 0 get a zero output row (is_live); the diagonal is zeroed explicitly.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MCNCL_HD __host__ __device__ __forceinline__
#else
#define MCNCL_HD inline
#endif

namespace mcncl {
namespace supcon {

constexpr double kLog2e = 1.4426950408889634074;

// 2^x: one MUFU.EX2 on the GPU (flushes results below 2^-126 to 0, relative error ~2^-22);
// std::exp2 on the host.
MCNCL_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
MCNCL_HD double exp2_(double x) {
#if defined(__CUDA_ARCH__)
  return exp2(x);
#else
  return std::exp2(x);
#endif
}

// Per-row constants of G in exp2 form (see the top of the file). T: float on the GPU, double on the host.
template <typename T>
struct RowCoef {
  T u;        // log2(e) * log D_i, +inf when w_i == 0
  T wt;       // w_i * out_scale / tau
  T pw;       // wt_i / |P_i|, 0 when w_i == 0
  T theta;    // hard-negative threshold, +inf when w_i == 0
  int label;  // class id; < 0: ignored row
};

MCNCL_HD bool is_live(int label) { return label >= 0; }

// Added to s_ij for candidate j: 0 for live rows, NaN for ignored / out-of-range ones.
template <typename T>
MCNCL_HD T candidate_bias(int label) {
  return is_live(label) ? T(0) : T(NAN);
}

template <typename T>
MCNCL_HD RowCoef<T> row_coef(float theta, float logd, float w, float inv_npos, int label, T inv_tau, T out_scale) {
  const bool anchor = w != 0.f;
  RowCoef<T> r;
  r.wt = anchor ? static_cast<T>(w) * (inv_tau * out_scale) : T(0);
  r.u = anchor ? static_cast<T>(logd) * static_cast<T>(kLog2e) : T(INFINITY);
  r.pw = anchor ? static_cast<T>(inv_npos) * r.wt : T(0);
  r.theta = anchor ? static_cast<T>(theta) : T(INFINITY);
  r.label = label;
  return r;
}

// A row that does not exist (past N or outside the tile): never an anchor, never a candidate.
template <typename T>
MCNCL_HD RowCoef<T> dead_row_coef() {
  return row_coef<T>(0.f, 0.f, 0.f, 0.f, -1, T(0), T(0));
}

// Row i of modality m from the flat arrays the caller passes (theta/logd/w: [M, N]; inv_npos/labels: [N]).
template <typename T>
MCNCL_HD RowCoef<T> load_row_coef(const float* theta, const float* logd, const float* w, const float* inv_npos,
                                  const int* labels, long long m, long long i, long long n, T inv_tau, T out_scale) {
  const long long k = m * n + i;
  return row_coef<T>(theta[k], logd[k], w[k], inv_npos[i], labels[i], inv_tau, out_scale);
}

// G_ab * out_scale for anchor a and candidate b, given s (+ b's bias) and same = label_a == label_b.
template <typename T>
MCNCL_HD T g_term(T s, bool same, const RowCoef<T>& a, T kappa) {
  const T e = exp2_(s * kappa - a.u);
  const T g = e * a.wt - (same ? a.pw : T(0));
  return (same || s >= a.theta) ? g : T(0);
}

// A_ij * out_scale = (G_ij + G_ji) * out_scale for i != j; s = s_ij + candidate_bias(label_j).
template <typename T>
MCNCL_HD T pair_coeff(T s, const RowCoef<T>& ri, const RowCoef<T>& rj, T kappa) {
  const bool same = ri.label == rj.label;
  return g_term<T>(s, same, ri, kappa) + g_term<T>(s, same, rj, kappa);
}

// ------------------------------------------------------------------ tile schedule
// A block owns anchor rows [i0, i0 + BM) and output columns chunk c (of nchunks D-chunks). It walks
// the column tiles; for each tile it visits the D-chunks in the order c+1, c+2, ..., c (mod nchunks),
// accumulating S, so that the chunk of Z_J staged last is the block's output chunk and feeds the
// second GEMM without another load. Step t of the block's pipeline is (tile, chunk) below.
struct StagePlan {
  int tile;    // column tile
  int chunk;   // D-chunk staged at this step
  bool first;  // first chunk of the tile: start S
  bool last;   // last chunk of the tile (== the output chunk): finish S, form A, dZ_I += A Z_J
};

MCNCL_HD StagePlan stage_plan(int t, int nchunks, int out_chunk) {
  StagePlan s;
  s.tile = t / nchunks;
  const int q = t - s.tile * nchunks;
  s.chunk = (out_chunk + 1 + q) % nchunks;
  s.first = q == 0;
  s.last = q == nchunks - 1;
  return s;
}

// The step after `s` (stage_plan(t + 1) from stage_plan(t) without a division).
MCNCL_HD StagePlan next_stage(const StagePlan& s, int nchunks, int out_chunk) {
  StagePlan n;
  n.tile = s.last ? s.tile + 1 : s.tile;
  n.chunk = s.chunk + 1 == nchunks ? 0 : s.chunk + 1;
  n.first = s.last;
  n.last = n.chunk == out_chunk;
  return n;
}

MCNCL_HD int ceil_div(long long a, int b) { return static_cast<int>((a + b - 1) / b); }

// Number of k-steps of width `step` that cover the valid part of chunk `chunk` of width `width` of D.
MCNCL_HD int chunk_steps(long long d, int chunk, int width, int step) {
  const long long left = d - static_cast<long long>(chunk) * width;
  return ceil_div(left < width ? left : width, step);
}

// Anchor rows [i0, i0 + bm) and columns [j0, j0 + bn) share an index: the tile holds diagonal elements.
MCNCL_HD bool tile_has_diagonal(long long i0, int bm, long long j0, int bn) { return j0 < i0 + bm && i0 < j0 + bn; }

// Element e of a `threads`-thread copy of a rows x cols tile in pieces of `vec` elements: piece
// s = tid + e * threads covers row s / (cols / vec), columns [(s % (cols / vec)) * vec, + vec).
MCNCL_HD int copy_row(int tid, int e, int threads, int cols, int vec) { return (tid + e * threads) / (cols / vec); }
MCNCL_HD int copy_col(int tid, int e, int threads, int cols, int vec) {
  return (tid + e * threads) % (cols / vec) * vec;
}

// ------------------------------------------------------------------ mma.m16n8k16 fragment layouts
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4)
// Accumulator (16 x 8, f32) element e in 0..3: row g + 8 (e / 2), column 2 t + e % 2.
MCNCL_HD int mma_c_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
MCNCL_HD int mma_c_col(int lane, int e) { return ((lane & 3) << 1) + (e & 1); }
// A operand (16 x 16, 16-bit) register r in 0..3, half h (0 = low 16 bits): row g + 8 (r % 2),
// column 2 t + h + 8 (r / 2).
MCNCL_HD int mma_a_row(int lane, int r) { return (lane >> 2) + ((r & 1) << 3); }
MCNCL_HD int mma_a_col(int lane, int r, int h) { return ((lane & 3) << 1) + h + ((r >> 1) << 3); }
// B operand (16 x 8, 16-bit) register r in 0..1, half h: k = 2 t + h + 8 r, n = g.
MCNCL_HD int mma_b_k(int lane, int r, int h) { return ((lane & 3) << 1) + h + (r << 3); }
MCNCL_HD int mma_b_n(int lane) { return lane >> 2; }
// The accumulators of S over 16 consecutive columns (n8 tiles 2 kk and 2 kk + 1) are, element for
// element, the A operand of k-step kk of the next GEMM: register r holds n8 tile 2 kk + r / 2,
// elements 2 (r % 2) and 2 (r % 2) + 1 (low and high half).
MCNCL_HD int s_to_a_tile(int kk, int r) { return 2 * kk + (r >> 1); }
MCNCL_HD int s_to_a_elem(int r, int h) { return ((r & 1) << 1) + h; }

// ldmatrix.x4: lane l gives the row address of row l % 8 of 8x8 matrix l / 8; register q of every
// lane receives a piece of matrix q (element (g, 2t + h), or (2t + h, g) with .trans).
// A operand of a 16 x 16 block of row-major [row][k] storage: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15)
// in register order a0..a3.
MCNCL_HD int ldsm_a_row(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
MCNCL_HD int ldsm_a_col(int lane) { return (lane >> 4) << 3; }
// B operands of two n8 tiles from [n][k] storage (no .trans): matrix q holds n 8 (q / 2) + 0..7,
// k 8 (q % 2) + 0..7, i.e. registers b0, b1 of the first tile, then of the second.
MCNCL_HD int ldsm_bn_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
MCNCL_HD int ldsm_bn_col(int lane) { return ((lane >> 3) & 1) << 3; }
// B operands of two n8 tiles from [k][n] storage (.trans): matrix q holds k 8 (q % 2) + 0..7,
// n 8 (q / 2) + 0..7; same register order.
MCNCL_HD int ldsm_bt_row(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
MCNCL_HD int ldsm_bt_col(int lane) { return (lane >> 4) << 3; }

}  // namespace supcon
}  // namespace mcncl
