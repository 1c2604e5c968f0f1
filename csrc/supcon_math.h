// Per-element math of the hard-negative SupCon backward (DESIGN.md §4.3), written once and
// used by both the CUDA kernels (supcon_cuda.cu) and the host implementation (supcon_host.cpp),
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
// Since s_ij depends
// on z'_i through both s_ij and s_ji,
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
#pragma once

#if defined(__CUDACC__)
#define MCNCL_HD __host__ __device__ __forceinline__
#else
#define MCNCL_HD inline
#include <cmath>
#endif

namespace mcncl {
namespace supcon {

// Per-row values saved by the forward (and the label), for one modality.
struct RowStats {
  float theta;     // hard-negative threshold (see above)
  float logd;      // log D_i
  float w;         // g / A for anchors with a positive, 0 otherwise
  float inv_npos;  // 1 / |P_i| (0 when |P_i| = 0)
  int label;
};

MCNCL_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
MCNCL_HD double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

// Offset of element (m, i, d) of a [M, N, D] tensor given in element strides.
MCNCL_HD long long offset3(long long m, long long i, long long d, long long sm, long long sn, long long sd) {
  return m * sm + i * sn + d * sd;
}

// Offset of row (m, i) of a contiguous [M, N] per-row array.
MCNCL_HD long long row_index(long long m, long long i, long long n) { return m * n + i; }

// True when j enters the denominator of anchor i: a positive, or a hard negative (s >= theta_i).
template <typename T>
MCNCL_HD bool in_denominator(bool same_label, T s, T theta) {
  return same_label || s >= theta;
}

// G_ij for s = s_ij (index i = anchor, j = other). T is float on the GPU, float/double on the host.
template <typename T>
MCNCL_HD T g_coeff(T s, bool same_index, const RowStats& ri, int label_j, T inv_tau) {
  if (same_index || ri.w == 0.f || label_j < 0) return T(0);
  const bool same = ri.label == label_j;
  T g = T(0);
  if (in_denominator<T>(same, s, static_cast<T>(ri.theta)))
    g = exp_(s * inv_tau - static_cast<T>(ri.logd)) * inv_tau;
  if (same) g -= static_cast<T>(ri.inv_npos) * inv_tau;
  return static_cast<T>(ri.w) * g;
}

// A_ij = G_ij + G_ji: the symmetric coefficient multiplying z'_j in dL/dz'_i.
template <typename T>
MCNCL_HD T pair_coeff(T s, long long i, long long j, const RowStats& ri, const RowStats& rj, T inv_tau) {
  const bool same_index = i == j;
  return g_coeff<T>(s, same_index, ri, rj.label, inv_tau) + g_coeff<T>(s, same_index, rj, ri.label, inv_tau);
}

// Per-row values of row i of modality m from the flat arrays the Python side passes.
MCNCL_HD RowStats load_row(const float* theta, const float* logd, const float* w, const float* inv_npos,
                           const int* labels, long long m, long long i, long long n) {
  RowStats r;
  const long long k = row_index(m, i, n);
  r.theta = theta[k];
  r.logd = logd[k];
  r.w = w[k];
  r.inv_npos = inv_npos[i];
  r.label = labels[i];
  return r;
}

}  // namespace supcon
}  // namespace mcncl
