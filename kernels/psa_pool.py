"""psa_pool without the per-frame convolution (DESIGN.md §3; issue #5).

The pooled output only needs the squeeze z = masked mean of the branch output y, and the mean of a
convolution is a convolution of windowed sums. For branch s (kernel K, padding P), tap j, with
m the frame mask, V = sum_t m[t], cnt = max(V, 1) and x_m the masked input:

  S_j[n, i] = sum_t m[t] x_m[t + j - P, i] = sum_u x_m[u, i] m[u - j + P]     (zero outside [0, L))
  z[n, o]   = (V b[o] + sum_j sum_i W[o, i, j] S_j[n, i]) / cnt

so the forward is one pass over x computing S [N, 24 * Q] (fp32; branch s, tap j at column
(s(s+2) + j) * Q) and four small GEMMs S_s @ W_s ([N, K Q] x [K Q, Q]). With the SE gradient
a = dz / cnt, the branch-output gradient is dy[n, t, o] = m[t] a[n, o], hence

  dW[o, i, j] = sum_n a[n, o] S_j[n, i]         (GEMM S_s^T a_s, reusing the saved S)
  db[o]       = sum_n V[n] a[n, o]
  dx[n, u, i] = m[u] sum_j m[u - j + P] B_j[n, i],   B_j[n, i] = sum_o a[n, o] W[o, i, j]  (GEMM a_s W_s^T)

The per-frame work is elementwise (no matmul over frames): O(N L C K) adds instead of the
O(N L C Q K) multiply-adds of the convolution, and x is read once in the forward and dx written
once in the backward. The GEMMs are torch matmuls in fp32 (deterministic; no TF32 by default).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .psa import (BRANCHES, CONV_CONFIGS, PRUNE, block_l, block_q, branch_tile, empty, frame_ok, mask_arg, pack_conv,
                  se_forward)
from .psa_backward import se_backward

TAPS = 3 + 5 + 7 + 9


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_window_sum_kernel(x_ptr, mask_ptr, s_ptr, N, L, C, Q, HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """S[n, (s(s+2) + j) Q + i] = sum_u x_m[n, u, sQ + i] m[n, u - j + P]; grid (row blocks, 4 x channel blocks)."""
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    s, offs_i, row0, rows, tt = branch_tile(Q, BLOCK_Q, BLOCK_M, BLOCK_L)
    K = 2 * s + 3
    PAD = s + 1
    i_ok = offs_i < Q
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    nrows = row0 + tl.arange(0, BLOCK_N)
    s_rows = s_ptr + nrows.to(tl.int64) * (4 * Q * 6) + s * (s + 2) * Q
    for j in range(0, K):
        acc = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
        for t0 in range(0, L, BLOCK_L):
            u = t0 + tt
            x_ok = frame_ok(mask_ptr, rows64, u, row_ok & (u < L), L, HAS_MASK)
            t = u + (PAD - j)                                   # the output frame u feeds through tap j
            ok = frame_ok(mask_ptr, rows64, t, x_ok & (t >= 0) & (t < L), L, HAS_MASK)
            x_rows = x_ptr + (rows64 * L + u) * C + s * Q
            xs = tl.load(x_rows[:, None] + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
            acc += tl.sum(tl.reshape(xs.to(tl.float32), (BLOCK_N, BLOCK_L, BLOCK_Q)), axis=1)
        tl.store(s_rows[:, None] + j * Q + offs_i[None, :], acc, mask=(nrows < N)[:, None] & i_ok[None, :])


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_window_dx_kernel(bmat_ptr, mask_ptr, dx_ptr, N, L, C, Q, HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx[n, u, sQ + i] = m[u] sum_j m[u - j + P] B[n, (s(s+2) + j) Q + i]; grid as the window sums."""
    s, offs_i, _, rows, tt = branch_tile(Q, BLOCK_Q, BLOCK_M, BLOCK_L)
    K = 2 * s + 3
    PAD = s + 1
    i_ok = offs_i < Q
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    b_rows = bmat_ptr + rows64 * (4 * Q * 6) + s * (s + 2) * Q
    for t0 in range(0, L, BLOCK_L):
        u = t0 + tt
        u_ok = row_ok & (u < L)
        x_ok = frame_ok(mask_ptr, rows64, u, u_ok, L, HAS_MASK)
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            t = u + (PAD - j)
            ok = frame_ok(mask_ptr, rows64, t, x_ok & (t >= 0) & (t < L), L, HAS_MASK)
            acc += tl.load(b_rows[:, None] + j * Q + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        dx_rows = dx_ptr + (rows64 * L + u) * C + s * Q
        tl.store(dx_rows[:, None] + offs_i[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=u_ok[:, None] & i_ok[None, :])


def branch_columns(s: int, q: int) -> slice:
    """Columns of branch s in S / B [N, 24 Q]."""
    return slice(s * (s + 2) * q, (s + 1) * (s + 3) * q)


def packed_branch(w_packed: torch.Tensor, s: int, q: int) -> torch.Tensor:
    """Branch s of the packed conv weights as an fp32 [K Q_in, Q_out] matrix."""
    k = 2 * s + 3
    start = s * (s + 2) * q * q
    return w_packed[start:start + k * q * q].view(k * q, q).float()


def frame_counts(x, frame_mask):
    """(V, cnt): valid frames per row and max(V, 1), fp32 [N]."""
    n, length, _ = x.shape
    if frame_mask is None:
        valid = torch.full((n,), float(length), device=x.device, dtype=torch.float32)
    else:
        valid = frame_mask.sum(dim=1).to(torch.float32)
    return valid, valid.clamp(min=1.0)


def window_sums(x, mask, has_mask):
    """S [N, 24 Q] fp32."""
    n, length, c = x.shape
    q = c // BRANCHES
    sums = empty((n, TAPS * q), x, torch.float32)
    bq = block_q(q)
    _psa_window_sum_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                         BRANCHES * triton.cdiv(q, bq))](
        x, mask, sums, n, length, c, q, HAS_MASK=has_mask, BLOCK_Q=bq)
    return sums


def squeeze_from_sums(sums, w_packed, b_packed, valid, cnt):
    """z [N, C] = (V b + S_s @ W_s) / cnt per branch (fp32)."""
    q = b_packed.numel() // BRANCHES
    parts = [sums[:, branch_columns(s, q)] @ packed_branch(w_packed, s, q) for s in range(BRANCHES)]
    z = torch.cat(parts, dim=1)
    return (z + valid[:, None] * b_packed.float()[None, :]) / cnt[:, None]


def pool_conv_backward(a, sums, x, w_packed, weights, valid, mask, has_mask):
    """From a = dz / cnt [N, C]: dx, 4 dW, 4 db (input dtypes)."""
    n, length, c = x.shape
    q = c // BRANCHES
    d_weights, d_biases, b_cols = [], [], []
    for s, w in enumerate(weights):
        a_s = a[:, s * q:(s + 1) * q]
        w_s = packed_branch(w_packed, s, q)                       # [K Q_in, Q_out]
        s_s = sums[:, branch_columns(s, q)]                       # [N, K Q_in]
        k = w.shape[-1]
        d_weights.append((s_s.t() @ a_s).view(k, q, q).permute(2, 1, 0).contiguous().to(w.dtype))
        d_biases.append((valid @ a_s).to(w.dtype))
        b_cols.append(a_s @ w_s.t())                              # [N, K Q_in]
    b_mat = torch.cat(b_cols, dim=1).contiguous()
    dx = empty(x.shape, x)
    bq = block_q(q)
    _psa_window_dx_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                        BRANCHES * triton.cdiv(q, bq))](
        b_mat, mask, dx, n, length, c, q, HAS_MASK=has_mask, BLOCK_Q=bq)
    return dx, d_weights, d_biases


def psa_pool_forward(x, weights, biases, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask):
    """psa_pool's forward. Returns (pool [N, C], S [N, 24 Q], z, h, g) (S, z, h, g fp32)."""
    x = x.contiguous()
    w_packed, b_packed = pack_conv(weights, biases)
    mask, has_mask = mask_arg(x, frame_mask)
    valid, cnt = frame_counts(x, frame_mask)
    sums = window_sums(x, mask, has_mask)
    z = squeeze_from_sums(sums, w_packed, b_packed, valid, cnt).contiguous()
    h, g, pooled = se_forward(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool=True)
    return pooled, sums, z, h, g


def psa_pool_backward(grad, x, sums, z, h, g, weights, fc1_w, fc2_w, frame_mask):
    """psa_pool's backward from d pool [N, C]: the 13 input gradients (as psa_backward)."""
    x = x.contiguous()
    mask, has_mask = mask_arg(x, frame_mask)
    valid, cnt = frame_counts(x, frame_mask)
    a, fc_grads = se_backward(grad.contiguous(), None, z, h, g, cnt, fc1_w, fc2_w, mask, has_mask, pool=True)
    w_packed, _ = pack_conv(weights, [w.new_empty(0) for w in weights])
    dx, d_weights, d_biases = pool_conv_backward(a, sums, x, w_packed, weights, valid, mask, has_mask)
    return (dx, *d_weights, *d_biases, *fc_grads)
