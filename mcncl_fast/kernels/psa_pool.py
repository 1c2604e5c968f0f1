"""psa_pool without the per-frame convolution (DESIGN.md §3).

The pooled output only needs the squeeze z = masked mean of the branch output y, and the mean of a
convolution is a convolution of windowed sums. For branch s (kernel K, padding P), tap j, with
m the frame mask, V = sum_t m[t], cnt = max(V, 1) and x_m the masked input:

  S_j[n, i] = sum_t m[t] x_m[t + j - P, i] = sum_u x_m[u, i] m[u - j + P]     (zero outside [0, L))
  z[n, o]   = (V b[o] + sum_j sum_i W[o, i, j] S_j[n, i]) / cnt

With the SE gradient a = dz / cnt, the branch-output gradient is dy[n, t, o] = m[t] a[n, o], hence

  dW[o, i, j] = sum_n a[n, o] S_j[n, i]         (S saved by the forward: [N, 24 Q] fp32, branch s,
  db[o]       = sum_n V[n] a[n, o]               tap j at column (s(s+2) + j) Q)
  dx[n, u, i] = m[u] sum_j m[u - j + P] B_j[n, i],   B_j[n, i] = sum_o a[n, o] W[o, i, j]

Device operations: forward = 2 launches (_psa_window_squeeze_kernel, then the SE forward of
mcncl_fast/kernels/psa_se.py), backward = 3 (the SE backward, _psa_window_dx_kernel, the parameter-gradient kernel
of mcncl_fast/kernels/psa_se.py); no ATen compute op. The small per-row matmuls S_j W_j^T and a W_j are
tl.dot on each program's rows inside the window kernels (fp32, input_precision="ieee"), the frame
counts and the bias term are computed there, and the weights are read in their own layout.
The per-frame work is elementwise (no matmul over frames): O(N L C K) adds instead of the
O(N L C Q K) multiply-adds of the convolution; x is read once in the forward, dx written once.
Tiles hold >= 16 whole rows (block_l_rows16): the per-row sums are tl.dot operands.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, prune_by
from ._psa_common import (BRANCHES, TAPS, _branch_pointer, _branch_tile, _count_valid_frames, _frame_ok,
                          block_l_rows16, block_q, branch_args, mask_arg, rows_grid)
from .psa_se import param_grads, se_bwd, se_fwd

# first config = the one the interpreter uses. No 64-slot tile: with >= 16 rows per tile it would
# only split the frames of the 128-slot tile, and it spills registers (bfloat16, sm_90).
WINDOW_CONFIGS = [
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=1),
]


@triton.autotune(configs=WINDOW_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
@triton.heuristics({"BLOCK_L": block_l_rows16})
@triton.jit
def _psa_window_squeeze_kernel(x_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                               s_ptr, z_ptr, N, L, C, Q, HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """grid (row blocks, 4 x output-channel blocks). Branch s, channels o of this program:
    S[n, (s(s+2) + j) Q + i] = window sums of every tap j (stored by the first output block) and
    z[n, sQ + o] = (V b[o] + sum_j S_j[n, :] W[o, :, j]) / max(V, 1)."""
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    s, offs_o, row0, rows, tt, K, PAD, w_ptr = _branch_tile(Q, w0_ptr, w1_ptr, w2_ptr, w3_ptr, BLOCK_Q,
                                                            BLOCK_M, BLOCK_L)
    o_ok = offs_o < Q
    # S is stored by the first output block; the others (Q > BLOCK_Q) recompute it for their dots
    s_rows_end = tl.where(tl.program_id(1) % tl.cdiv(Q, BLOCK_Q) == 0, N, 0)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    nrows = row0 + tl.arange(0, BLOCK_N)
    n_ok = nrows < N
    s_rows = s_ptr + nrows.to(tl.int64) * (TAPS * Q) + s * (s + 2) * Q
    z_acc = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
    for i0 in range(0, Q, BLOCK_Q):
        offs_i = i0 + tl.arange(0, BLOCK_Q)
        i_ok = offs_i < Q
        for j in range(0, K):
            sums = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
            for t0 in range(0, L, BLOCK_L):
                u = t0 + tt
                x_ok = _frame_ok(mask_ptr, rows64, u, row_ok & (u < L), L, HAS_MASK)
                t = u + (PAD - j)                               # the output frame u feeds through tap j
                ok = _frame_ok(mask_ptr, rows64, t, x_ok & (t >= 0) & (t < L), L, HAS_MASK)
                x_rows = x_ptr + (rows64 * L + u) * C + s * Q
                xs = tl.load(x_rows[:, None] + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
                sums += tl.sum(tl.reshape(xs.to(tl.float32), (BLOCK_N, BLOCK_L, BLOCK_Q)), axis=1)
            tl.store(s_rows[:, None] + j * Q + offs_i[None, :], sums,
                     mask=(nrows < s_rows_end)[:, None] & i_ok[None, :])
            w = tl.load(w_ptr + (offs_o[:, None] * Q + offs_i[None, :]) * K + j,
                        mask=o_ok[:, None] & i_ok[None, :], other=0.0)               # W[o, i, j] as [o, i]
            z_acc += tl.dot(sums, tl.trans(w.to(tl.float32)), input_precision="ieee")
    valid = _count_valid_frames(mask_ptr, nrows.to(tl.int64), n_ok, L, HAS_MASK, BLOCK_L)
    bias = tl.load(_branch_pointer(s, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    z = (z_acc + valid[:, None] * bias[None, :]) / tl.maximum(valid, 1.0)[:, None]
    tl.store(z_ptr + (nrows.to(tl.int64) * C + s * Q)[:, None] + offs_o[None, :], z,
             mask=n_ok[:, None] & o_ok[None, :])


@triton.autotune(configs=WINDOW_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
@triton.heuristics({"BLOCK_L": block_l_rows16})
@triton.jit
def _psa_window_dx_kernel(a_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, dx_ptr, N, L, C, Q,
                          HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_L: tl.constexpr):
    """grid (row blocks, 4 x input-channel blocks). dx[n, u, sQ + i] = m[u] sum_j m[u - j + P] B_j[n, i]
    with B_j = a_s W_j^T computed here per row block (recomputed per frame tile when L > BLOCK_L)."""
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    s, offs_i, row0, rows, tt, K, PAD, w_ptr = _branch_tile(Q, w0_ptr, w1_ptr, w2_ptr, w3_ptr, BLOCK_Q,
                                                            BLOCK_M, BLOCK_L)
    i_ok = offs_i < Q
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    nrows64 = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = nrows64 < N
    for t0 in range(0, L, BLOCK_L):
        u = t0 + tt
        u_ok = row_ok & (u < L)
        x_ok = _frame_ok(mask_ptr, rows64, u, u_ok, L, HAS_MASK)
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            b_j = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
            for o0 in range(0, Q, BLOCK_Q):
                offs_o = o0 + tl.arange(0, BLOCK_Q)
                o_ok = offs_o < Q
                a_s = tl.load(a_ptr + (nrows64 * C + s * Q)[:, None] + offs_o[None, :],
                              mask=n_ok[:, None] & o_ok[None, :], other=0.0)
                w = tl.load(w_ptr + (offs_o[:, None] * Q + offs_i[None, :]) * K + j,
                            mask=o_ok[:, None] & i_ok[None, :], other=0.0)           # W[o, i, j] as [o, i]
                b_j += tl.dot(a_s, w.to(tl.float32), input_precision="ieee")
            t = u + (PAD - j)
            ok = _frame_ok(mask_ptr, rows64, t, x_ok & (t >= 0) & (t < L), L, HAS_MASK)
            b_frames = tl.reshape(tl.broadcast_to(b_j[:, None, :], (BLOCK_N, BLOCK_L, BLOCK_Q)), (BLOCK_M, BLOCK_Q))
            acc += tl.where(ok[:, None], b_frames, 0.0)
        dx_rows = dx_ptr + (rows64 * L + u) * C + s * Q
        tl.store(dx_rows[:, None] + offs_i[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=u_ok[:, None] & i_ok[None, :])


def psa_pool_fwd(x, weights, biases, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask):
    """psa_pool's forward. Returns (pool [N, C], S [N, 24 Q], z, h, g) (S, z, h, g fp32)."""
    x = x.contiguous()
    n, length, c = x.shape
    q = c // BRANCHES
    mask, has_mask = mask_arg(x, frame_mask)
    sums = empty((n, TAPS.value * q), x, torch.float32)
    z = empty((n, c), x, torch.float32)
    _psa_window_squeeze_kernel[rows_grid(n, q)](
        x, mask, *branch_args(weights), *branch_args(biases), sums, z, n, length, c, q,
        HAS_MASK=has_mask, BLOCK_Q=block_q(q))
    h, g, pooled = se_fwd(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool=True)
    return pooled, sums, z, h, g


def psa_pool_bwd(grad, x, sums, z, h, g, weights, fc1_w, fc2_w, frame_mask):
    """psa_pool's backward from d pool [N, C] (any strides): the 13 input gradients (as psa_bwd)."""
    x = x.contiguous()
    n, length, c = x.shape
    q = c // BRANCHES
    mask, has_mask = mask_arg(x, frame_mask)
    a, dpre1, dpre2, frames = se_bwd(grad, z, h, g, fc1_w, fc2_w, mask, has_mask, length, pool=True)
    weights = branch_args(weights)
    dx = empty(x.shape, x)
    _psa_window_dx_kernel[rows_grid(n, q)](a, mask, *weights, dx, n, length, c, q, HAS_MASK=has_mask,
                                           BLOCK_Q=block_q(q))
    d_weights, d_biases, fc_grads = param_grads(weights, fc1_w, fc2_w, z, h, a, dpre1, dpre2, sums=sums,
                                                frames=frames)
    return (dx, *d_weights, *d_biases, *fc_grads)
