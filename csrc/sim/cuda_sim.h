// CPU stand-ins for the CUDA built-ins and the PTX wrappers (supcon_ptx.cuh) that the SupCon kernel
// bodies use, so that supcon_mma.cuh / supcon_simt.cuh run unchanged on the host (sim/supcon_sim.cpp;
// test only, never part of the extension). One std::thread per CUDA thread; __syncthreads and the
// warp-collective ldmatrix / mma.sync are std::barrier rendezvous. The fragment layouts below are
// written out from the PTX ISA on their own (not with the supcon_math.h helpers they check).
// cp.async copies land either when issued or at the wait (both are legal; tests run both, so a read
// before the wait or a write into a buffer still being read shows up as a wrong result).
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }

namespace mcncl {
namespace supcon {
namespace sim {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// What the lanes of one warp put on the table for a collective operation.
struct WarpTable {
  const uint16_t* addr[32];
  unsigned a[32][4], b[32][2];
  float c[32][4];
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Thread {
  Dim3 thread, block, grid, block_dim;
  unsigned char* smem;
  std::barrier<>* block_barrier;
  std::barrier<>* warp_barrier;
  WarpTable* warp_table;
  bool land_at_wait;
  std::vector<Copy> pending;
};
inline thread_local Thread* self = nullptr;

inline void land(const Copy& c) {
  if (c.valid)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
inline uint16_t float_to_f16(float f) {
  const _Float16 x = static_cast<_Float16>(f);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

inline int lane_id() { return static_cast<int>(self->thread.x & 31); }
inline void warp_sync() { self->warp_barrier->arrive_and_wait(); }

}  // namespace sim

#define threadIdx (::mcncl::supcon::sim::self->thread)
#define blockIdx (::mcncl::supcon::sim::self->block)
#define gridDim (::mcncl::supcon::sim::self->grid)
#define blockDim (::mcncl::supcon::sim::self->block_dim)

inline void __syncthreads() { sim::self->block_barrier->arrive_and_wait(); }

inline unsigned char* dynamic_smem() { return sim::self->smem; }

inline void cp_async16(void* dst, const void* src, bool valid) {
  const sim::Copy c{dst, src, valid};
  if (sim::self->land_at_wait)
    sim::self->pending.push_back(c);
  else
    sim::land(c);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  for (const sim::Copy& c : sim::self->pending) sim::land(c);
  sim::self->pending.clear();
}

// ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8 (8 consecutive 16-bit elements).
// Register q of lane l: elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix q, or with
// .trans elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4); the first in the low 16 bits.
inline void ldsm_sim(unsigned (&r)[4], const uint16_t* p, bool trans) {
  sim::WarpTable& x = *sim::self->warp_table;
  const int l = sim::lane_id();
  x.addr[l] = p;
  sim::warp_sync();
  for (int q = 0; q < 4; ++q) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = x.addr[8 * q + l / 4];
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      lo = x.addr[8 * q + 2 * (l % 4)][l / 4];
      hi = x.addr[8 * q + 2 * (l % 4) + 1][l / 4];
    }
    r[q] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
  }
  sim::warp_sync();
}
inline void ldsm_x4(unsigned (&r)[4], const uint16_t* p) { ldsm_sim(r, p, false); }
inline void ldsm_x4_trans(unsigned (&r)[4], const uint16_t* p) { ldsm_sim(r, p, true); }

// mma.m16n8k16.row.col, float32 accumulation. PTX fragment layouts (g = lane / 4, t = lane % 4):
//   A: half i of the 8 (registers i / 2): row g (i in 0,1,4,5) or g + 8, column 2 t + i % 2 (+ 8 for i >= 4)
//   B: half i of the 4: k = 2 t + i % 2 (+ 8 for i >= 2), n = g
//   C: element i of the 4: row g (i < 2) or g + 8, column 2 t + i % 2
template <bool kBF16>
inline void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  sim::WarpTable& x = *sim::self->warp_table;
  const int l = sim::lane_id();
  for (int i = 0; i < 4; ++i) x.a[l][i] = a[i], x.c[l][i] = c[i];
  x.b[l][0] = b0;
  x.b[l][1] = b1;
  sim::warp_sync();
  auto half = [](unsigned reg, int h) {
    const uint16_t v = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
    return kBF16 ? sim::bf16_to_float(v) : sim::f16_to_float(v);
  };
  float A[16][16], B[16][8], C[16][8];
  for (int s = 0; s < 32; ++s) {
    const int g = s / 4, t = s % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      A[row][2 * t + i % 2 + (i >= 4 ? 8 : 0)] = half(x.a[s][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + (i >= 2 ? 8 : 0)][g] = half(x.b[s][i / 2], i % 2);
    for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][2 * t + i % 2] = x.c[s][i];
  }
  sim::warp_sync();
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8, col = 2 * t + i % 2;
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] = acc;
  }
}

template <bool kBF16>
inline unsigned pack16(float lo, float hi) {
  auto to16 = [](float f) { return kBF16 ? sim::float_to_bf16(f) : sim::float_to_f16(f); };
  return static_cast<unsigned>(to16(lo)) | (static_cast<unsigned>(to16(hi)) << 16);
}

}  // namespace supcon
}  // namespace mcncl
