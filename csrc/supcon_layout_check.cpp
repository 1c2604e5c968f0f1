// Host-side check of the index helpers of supcon_math.h that the CUDA kernels rely on: the tile
// schedule, the cooperative copy maps, and the mma.m16n8k16 / ldmatrix fragment layouts (ldmatrix is
// simulated from its PTX definition). Exposed to Python as _C.supcon_layout_check() -> list of errors.
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "supcon_api.h"
#include "supcon_math.h"

namespace mcncl {
namespace {

using namespace supcon;

struct Checker {
  std::vector<std::string> errors;
  void expect(bool ok, const std::string& what) {
    if (!ok && errors.size() < 50) errors.push_back(what);
  }
};

// ldmatrix.x4 on a storage addressed as (row, col): lane a gives the row address of row a % 8 of matrix
// a / 8. Returns the storage element that lane l receives in register q, half h.
std::pair<int, int> ldmatrix(int (*row)(int), int (*col)(int), bool trans, int l, int q, int h) {
  const int r = trans ? 2 * (l & 3) + h : l >> 2;  // row of the 8x8 matrix
  const int c = trans ? l >> 2 : 2 * (l & 3) + h;  // column of the 8x8 matrix
  const int src = 8 * q + r;                        // lane that supplied that row's address
  return {row(src), col(src) + c};
}

void check_schedule(Checker& ck) {
  for (int nchunks = 1; nchunks <= 5; ++nchunks)
    for (int out = 0; out < nchunks; ++out) {
      std::set<std::pair<int, int>> seen;
      for (int t = 0; t < 3 * nchunks; ++t) {
        const StagePlan s = stage_plan(t, nchunks, out);
        const std::string at = " (t=" + std::to_string(t) + ", nchunks=" + std::to_string(nchunks) + ")";
        ck.expect(s.tile == t / nchunks, "stage_plan: tiles in order" + at);
        ck.expect(seen.insert({s.tile, s.chunk}).second, "stage_plan: (tile, chunk) visited twice" + at);
        ck.expect(s.first == (t % nchunks == 0), "stage_plan: first" + at);
        ck.expect(s.last == (t % nchunks == nchunks - 1), "stage_plan: last" + at);
        if (s.last) ck.expect(s.chunk == out, "stage_plan: the last chunk of a tile is the output chunk" + at);
        const StagePlan n = next_stage(s, nchunks, out), e = stage_plan(t + 1, nchunks, out);
        ck.expect(n.tile == e.tile && n.chunk == e.chunk && n.first == e.first && n.last == e.last,
                  "next_stage == stage_plan(t + 1)" + at);
      }
      ck.expect(seen.size() == static_cast<size_t>(3 * nchunks), "stage_plan: every (tile, chunk) visited");
    }
  ck.expect(chunk_steps(128, 0, 128, 16) == 8 && chunk_steps(200, 1, 128, 16) == 5 &&
                chunk_steps(72, 0, 128, 16) == 5 && chunk_steps(36, 0, 128, 4) == 9,
            "chunk_steps");
  ck.expect(tile_has_diagonal(64, 64, 0, 64) == false && tile_has_diagonal(70, 64, 64, 64) &&
                tile_has_diagonal(10, 64, 64, 32) && !tile_has_diagonal(10, 64, 96, 32),
            "tile_has_diagonal");
}

void check_copy_maps(Checker& ck) {
  const int configs[][4] = {{128, 64, 128, 8}, {256, 32, 128, 4}, {256, 64, 128, 4}};  // threads, rows, cols, vec
  for (const auto& c : configs) {
    const int threads = c[0], rows = c[1], cols = c[2], vec = c[3];
    std::vector<int> hits(rows * cols, 0);
    for (int e = 0; e < rows * cols / vec / threads; ++e)
      for (int tid = 0; tid < threads; ++tid) {
        const int r = copy_row(tid, e, threads, cols, vec), col = copy_col(tid, e, threads, cols, vec);
        // stage_tile walks rows r0, r0 + threads / (cols / vec), ... in one column piece
        ck.expect(r == copy_row(tid, 0, threads, cols, vec) + e * (threads / (cols / vec)) &&
                      col == copy_col(tid, 0, threads, cols, vec),
                  "copy map: fixed column, constant row step");
        ck.expect(r >= 0 && r < rows && col >= 0 && col + vec <= cols && col % vec == 0, "copy map in range");
        if (r >= 0 && r < rows && col >= 0 && col + vec <= cols)
          for (int v = 0; v < vec; ++v) ++hits[r * cols + col + v];
      }
    bool once = true;
    for (int h : hits) once = once && h == 1;
    ck.expect(once, "copy map covers the tile exactly once (threads " + std::to_string(threads) + ")");
  }
}

void check_fragments(Checker& ck) {
  for (int l = 0; l < 32; ++l) {
    const std::string at = " (lane " + std::to_string(l) + ")";
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2; ++h) {
        // A operand of S = Z_I Z_J^T from [row][k] storage
        auto a = ldmatrix(ldsm_a_row, ldsm_a_col, false, l, q, h);
        ck.expect(a.first == mma_a_row(l, q) && a.second == mma_a_col(l, q, h), "ldmatrix A layout" + at);
        // B operand of S: B[k][n] = Z_J[n][k], storage [n][k], two n8 tiles
        auto bn = ldmatrix(ldsm_bn_row, ldsm_bn_col, false, l, q, h);
        ck.expect(bn.first == 8 * (q >> 1) + mma_b_n(l) && bn.second == mma_b_k(l, q & 1, h),
                  "ldmatrix B ([n][k]) layout" + at);
        // B operand of dZ = A Z_J: B[k][n] = Z_J[k][n], storage [k][n] with .trans, two n8 tiles
        auto bt = ldmatrix(ldsm_bt_row, ldsm_bt_col, true, l, q, h);
        ck.expect(bt.first == mma_b_k(l, q & 1, h) && bt.second == 8 * (q >> 1) + mma_b_n(l),
                  "ldmatrix B ([k][n], trans) layout" + at);
      }
    // S accumulators -> A operand of the second GEMM, element for element
    for (int kk = 0; kk < 4; ++kk)
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) {
          const int tile = s_to_a_tile(kk, r), e = s_to_a_elem(r, h);
          ck.expect(mma_c_row(l, e) == mma_a_row(l, r) && 8 * tile + mma_c_col(l, e) == 16 * kk + mma_a_col(l, r, h),
                    "S accumulator -> A operand" + at);
        }
  }
}

}  // namespace

std::vector<std::string> supcon_layout_check() {
  Checker ck;
  check_schedule(ck);
  check_copy_maps(ck);
  check_fragments(ck);
  return ck.errors;
}

}  // namespace mcncl
