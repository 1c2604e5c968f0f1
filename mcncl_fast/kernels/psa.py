"""Fused Pyramid Squeeze Attention, forward (DESIGN.md §3, §4.1). Backward: mcncl_fast/kernels/psa_backward.py.

x [N, L, C], Q = C/4 channels per branch s = 0..3, kernel K_s = 2s + 3, zero padding s + 1 (shared
pieces: mcncl_fast/kernels/_psa_common.py). psa's forward is three launches and no other device operation:
  _psa_conv_fwd_kernel   grid (row blocks, 4 branches x output-channel blocks). One pass over x:
                         the branch conv as K_s small matmuls tl.dot([frames, Q_in], W_j[Q_in, Q_out])
                         over shifted frame windows (input zeroed at padded frames), + bias; stores the
                         branch output y and the squeeze z = masked mean over frames (fp32).
  _psa_se_fwd_kernel     (mcncl_fast/kernels/psa_se.py) grid (row blocks). SE MLP h = relu(fc1 z), g = sigmoid(fc2 h).
  _psa_gate_apply_kernel grid (frame blocks, channel blocks). out = y * g * frame_mask.
psa_pool does not run the per-frame convolution at all (mcncl_fast/kernels/psa_pool.py): the squeeze is a
convolution of windowed sums of x, so it never materialises [N, L, C].

Tiles: a program covers BLOCK_N = BLOCK_M // BLOCK_L whole rows x BLOCK_L frames, flattened to
BLOCK_M matmul rows; per-row sums reshape [BLOCK_M, .] -> [BLOCK_N, BLOCK_L, .]. Longer rows loop
over frame tiles. fp32 dots use input_precision="ieee"; 16-bit inputs use 16-bit dot operands
with fp32 accumulation (under the interpreter bf16 operands are upcast: it cannot multiply bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, prune_by
from ._psa_common import (BRANCHES, CONV_CONFIGS, ELEMENTWISE_CONFIGS, _branch_pointer, _branch_tile, _frame_ok,
                          block_l, block_q, branch_args, dot_dtype, mask_arg, rows_grid)
from .psa_se import se_fwd


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_fwd_kernel(x_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                         y_ptr, z_ptr, N, L, C, Q, HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    s, offs_o, row0, rows, tt, K, PAD, w_ptr = _branch_tile(Q, w0_ptr, w1_ptr, w2_ptr, w3_ptr, BLOCK_Q,
                                                            BLOCK_M, BLOCK_L)
    o_ok = offs_o < Q
    offs_i = tl.arange(0, BLOCK_Q)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    bias = tl.load(_branch_pointer(s, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    zsum = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
    cnt = tl.zeros((BLOCK_N,), tl.float32)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tt
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            src = t + (j - PAD)
            src_ok = _frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
            x_row = x_ptr + (rows64 * L + src) * C + s * Q
            for i0 in range(0, Q, BLOCK_Q):
                ci = i0 + offs_i
                i_ok = ci < Q
                xs = tl.load(x_row[:, None] + ci[None, :], mask=src_ok[:, None] & i_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + (offs_o[None, :] * Q + ci[:, None]) * K + j,
                             mask=i_ok[:, None] & o_ok[None, :], other=0.0)          # W[o, i, j] as [i, o]
                acc += tl.dot(xs.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision="ieee")
        y = acc + bias[None, :]
        t_ok = row_ok & (t < L)
        y_rows = y_ptr + (rows64 * L + t) * C + s * Q
        tl.store(y_rows[:, None] + offs_o[None, :], y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & o_ok[None, :])
        valid = _frame_ok(mask_ptr, rows64, t, t_ok, L, HAS_MASK)
        ym = tl.where(valid[:, None], y, 0.0)
        zsum += tl.sum(tl.reshape(ym, (BLOCK_N, BLOCK_L, BLOCK_Q)), axis=1)
        cnt += tl.sum(tl.reshape(valid.to(tl.float32), (BLOCK_N, BLOCK_L)), axis=1)
    z = zsum / tl.maximum(cnt, 1.0)[:, None]
    zrows = row0 + tl.arange(0, BLOCK_N)
    tl.store(z_ptr + (zrows.to(tl.int64) * C + s * Q)[:, None] + offs_o[None, :], z,
             mask=(zrows < N)[:, None] & o_ok[None, :])


@triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
@triton.jit
def _psa_gate_apply_kernel(y_ptr, g_ptr, mask_ptr, out_ptr, N, L, C,
                           HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m64 = m.to(tl.int64)
    m_ok = m64 < N * L
    n64 = m64 // L
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    ok2 = m_ok[:, None] & c_ok[None, :]
    valid = m_ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + m64, mask=m_ok, other=0) != 0)
    y = tl.load(y_ptr + m64[:, None] * C + cc[None, :], mask=ok2, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n64[:, None] * C + cc[None, :], mask=ok2, other=0.0)
    out = tl.where(valid[:, None], y * g, 0.0)
    tl.store(out_ptr + m64[:, None] * C + cc[None, :], out.to(out_ptr.dtype.element_ty), mask=ok2)


def psa_fwd(x, weights, biases, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask):
    """psa's forward. Returns (out [N, L, C], y [N, L, C], z, h, g) (z, h, g fp32)."""
    x = x.contiguous()
    n, length, c = x.shape
    q = c // BRANCHES
    mask, has_mask = mask_arg(x, frame_mask)
    z = empty((n, c), x, torch.float32)
    y = empty(x.shape, x)
    _psa_conv_fwd_kernel[rows_grid(n, q)](
        x, mask, *branch_args(weights), *branch_args(biases), y, z, n, length, c, q,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=block_q(q))
    h, g, _ = se_fwd(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool=False)
    out = empty(x.shape, x)
    _psa_gate_apply_kernel[lambda meta: (triton.cdiv(n * length, meta["BLOCK_M"]),
                                         triton.cdiv(c, meta["BLOCK_C"]))](
        y, g, mask, out, n, length, c, HAS_MASK=has_mask)
    return out, y, z, h, g
