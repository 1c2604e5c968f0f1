"""Fused Pyramid Squeeze Attention, backward (DESIGN.md §3, §4.1). Forward: kernels/psa.py.

Math (m = frame mask, cnt = max(sum_t m, 1), y = branch output, g = gate, z = squeeze, h = SE hidden):
  psa:      out = m * y * g            dg = sum_t m * dout * y
  psa_pool: pool = g * z               dg = dpool * z,  and z gets dpool * g directly
            (psa_pool's branch backward is in kernels/psa_pool.py: no per-frame convolution)
  SE:       dpre2 = dg * g * (1 - g);  dh = dpre2 @ fc2_w;  dpre1 = dh * (h > 0);  dz = dpre1 @ fc1_w (+ dpool * g)
            a = dz / cnt
  branch:   dy = m * (dout * g + a)    (never materialised: each kernel rebuilds its tile from dout, g, a, m)
  conv:     dx[u, i] = m[u] * sum_j sum_o W[o, i, j] dy[u - j + pad, o]
            dW[o, i, j] = sum_{n, t} dy[t, o] x_m[t + j - pad, i],  db[o] = sum_{n, t} dy[t, o]

Kernels (psa's backward is these five launches, psa_pool's three of them; no ATen compute op):
  _psa_gate_grad_kernel  (psa only) dg row sums, one pass over dout and y.
  _psa_se_bwd_kernel     per row block: dpre2, dpre1, a (fp32); the frame counts come from the mask.
  _psa_conv_dx_kernel    transposed conv as K_s matmuls over shifted windows of dy.
  _psa_conv_dw_kernel    grid (24 taps x channel blocks, P row chunks): per-chunk partial dW (and db)
                         written to [P, ...] fp32 buffers (P depends only on N).
  _psa_param_grad_kernel every parameter gradient in its parameter's own layout and dtype: the conv
                         dW / db (psa: the sum of the P partials, in order; psa_pool: sum_n a^T S from
                         its window sums) and the SE fc gradients dpre1^T z, dpre2^T h and column sums.
                         One program per output tile, summing over all rows in a fixed order: a
                         deterministic reduction without atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .psa import (BRANCHES, CONV_CONFIGS, ELEMENTWISE_CONFIGS, PRUNE, SE_CONFIGS, TAPS, TAPS_CONST, block_h,
                  block_l, block_q, branch_args, branch_pointer, branch_tile, count_valid_frames, dot_dtype, empty,
                  frame_ok, interpreting, mask_arg)


def max_partials() -> int:
    # row chunks of the dW reduction: enough programs for a GPU (x 24 taps); 2 in the interpreter,
    # which pays per program (2 still exercises the two-stage sum)
    return 2 if interpreting() else 32


@triton.jit
def tap_branch(tap):
    """(branch s, tap j) of the tap-th of the 24 taps; branch s's K_s = 2s + 3 taps start at s(s + 2)."""
    s = (tap >= 3).to(tl.int32) + (tap >= 8).to(tl.int32) + (tap >= 15).to(tl.int32)
    return s, tap - s * (s + 2)


@triton.jit
def dy_tile(dout_ptr, g_ptr, a_ptr, rows64, t, valid, ch, ch_ok, L, C):
    """dy[row, t, ch] = m * (dout * g + a) as fp32 [rows, ch]; 0 where not valid."""
    ok2 = valid[:, None] & ch_ok[None, :]
    per_row = rows64[:, None] * C + ch[None, :]
    do = tl.load(dout_ptr + ((rows64 * L + t) * C)[:, None] + ch[None, :], mask=ok2, other=0.0).to(tl.float32)
    return tl.load(a_ptr + per_row, mask=ok2, other=0.0) + do * tl.load(g_ptr + per_row, mask=ok2, other=0.0)


@triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_gate_grad_kernel(dout_ptr, y_ptr, mask_ptr, dg_ptr, N, L, C, HAS_MASK: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.program_id(0) * BLOCK_N + offs_m // BLOCK_L
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tt = offs_m % BLOCK_L
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tt
        valid = frame_ok(mask_ptr, rows64, t, row_ok & (t < L), L, HAS_MASK)
        ok2 = valid[:, None] & c_ok[None, :]
        offs = ((rows64 * L + t) * C)[:, None] + cc[None, :]
        d = tl.load(dout_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        acc += tl.sum(tl.reshape(d * y, (BLOCK_N, BLOCK_L, BLOCK_C)), axis=1)
    nrows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(dg_ptr + nrows.to(tl.int64)[:, None] * C + cc[None, :], acc,
             mask=(nrows < N)[:, None] & c_ok[None, :])


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=PRUNE)
@triton.jit
def _psa_se_bwd_kernel(dg_ptr, z_ptr, h_ptr, g_ptr, mask_ptr, fc1w_ptr, fc2w_ptr, dpre2_ptr, dpre1_ptr, a_ptr,
                       frames_ptr, N, L, C, Q, stride_dn, stride_dc, POOL: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """POOL: dg_ptr holds dpool (x dtype, any strides: an expanded gradient is read in place), and the
    valid frames per row go to frames_ptr (fp32, for db); else dg_ptr holds dg (fp32)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < Q
    dh = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        ok2 = r_ok[:, None] & c_ok[None, :]
        offs = rows64[:, None] * C + cc[None, :]
        g = tl.load(g_ptr + offs, mask=ok2, other=0.0)
        dg = tl.load(dg_ptr + rows64[:, None] * stride_dn + cc[None, :] * stride_dc, mask=ok2, other=0.0)
        dg = dg.to(tl.float32)
        if POOL:
            dg = dg * tl.load(z_ptr + offs, mask=ok2, other=0.0)
        dpre2 = dg * g * (1.0 - g)
        tl.store(dpre2_ptr + offs, dpre2, mask=ok2)
        w2 = tl.load(fc2w_ptr + cc[:, None] * Q + offs_h[None, :], mask=c_ok[:, None] & h_ok[None, :],
                     other=0.0).to(tl.float32)                                      # fc2_w [C, H]
        dh += tl.dot(dpre2, w2, input_precision="ieee")
    h = tl.load(h_ptr + rows64[:, None] * Q + offs_h[None, :], mask=r_ok[:, None] & h_ok[None, :], other=0.0)
    dpre1 = tl.where(h > 0.0, dh, 0.0)
    tl.store(dpre1_ptr + rows64[:, None] * Q + offs_h[None, :], dpre1, mask=r_ok[:, None] & h_ok[None, :])
    valid = count_valid_frames(mask_ptr, rows64, r_ok, L, HAS_MASK, 16)
    if POOL:
        tl.store(frames_ptr + rows64, valid, mask=r_ok)
    cnt = tl.maximum(valid, 1.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        ok2 = r_ok[:, None] & c_ok[None, :]
        offs = rows64[:, None] * C + cc[None, :]
        w1 = tl.load(fc1w_ptr + offs_h[:, None] * C + cc[None, :], mask=h_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)                                      # fc1_w [H, C]
        dz = tl.dot(dpre1, w1, input_precision="ieee")
        if POOL:
            dpool = tl.load(dg_ptr + rows64[:, None] * stride_dn + cc[None, :] * stride_dc, mask=ok2, other=0.0)
            dz += dpool.to(tl.float32) * tl.load(g_ptr + offs, mask=ok2, other=0.0)
        tl.store(a_ptr + offs, dz / cnt[:, None], mask=ok2)


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_dx_kernel(dout_ptr, g_ptr, a_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, dx_ptr, N, L, C, Q,
                        HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    s, offs_i, _, rows, tt = branch_tile(Q, BLOCK_Q, BLOCK_M, BLOCK_L)
    K = 2 * s + 3
    PAD = s + 1
    w_ptr = branch_pointer(s, w0_ptr, w1_ptr, w2_ptr, w3_ptr)          # W[o, i, j] at (o Q + i) K + j
    i_ok = offs_i < Q
    offs_o = tl.arange(0, BLOCK_Q)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tt
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            src = t + (PAD - j)
            src_ok = frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
            for o0 in range(0, Q, BLOCK_Q):
                co = o0 + offs_o
                o_ok = co < Q
                dy = dy_tile(dout_ptr, g_ptr, a_ptr, rows64, src, src_ok, s * Q + co, o_ok, L, C)
                w = tl.load(w_ptr + (co[:, None] * Q + offs_i[None, :]) * K + j,
                            mask=o_ok[:, None] & i_ok[None, :], other=0.0)         # W[o, i, j] as [o, i]
                acc += tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision="ieee")
        t_ok = row_ok & (t < L)
        valid = frame_ok(mask_ptr, rows64, t, t_ok, L, HAS_MASK)
        dx = tl.where(valid[:, None], acc, 0.0)
        dx_rows = dx_ptr + (rows64 * L + t) * C + s * Q
        tl.store(dx_rows[:, None] + offs_i[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & i_ok[None, :])


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_dw_kernel(dout_ptr, g_ptr, a_ptr, mask_ptr, x_ptr, dw_ptr, db_ptr, N, L, C, Q, ROWS_PER_PROG,
                        TOTAL_W, HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    pid_t = tl.program_id(0)     # taps vary fastest: programs running together read the same rows (L2)
    pid_p = tl.program_id(1)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    tap = pid_t // (num_qb * num_qb)
    ob = (pid_t // num_qb) % num_qb
    ib = pid_t % num_qb
    s, j = tap_branch(tap)
    PAD = s + 1
    offs_o = ob * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_ok = offs_o < Q
    offs_i = ib * BLOCK_Q + tl.arange(0, BLOCK_Q)
    i_ok = offs_i < Q
    offs_m = tl.arange(0, BLOCK_M)
    tt = offs_m % BLOCK_L
    acc = tl.zeros((BLOCK_Q, BLOCK_Q), tl.float32)
    db = tl.zeros((BLOCK_Q,), tl.float32)
    row_start = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, N)
    for r0 in range(row_start, row_end, BLOCK_N):
        rows = r0 + offs_m // BLOCK_L
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        for t0 in range(0, L, BLOCK_L):
            t = t0 + tt
            valid = frame_ok(mask_ptr, rows64, t, row_ok & (t < L), L, HAS_MASK)
            dy = dy_tile(dout_ptr, g_ptr, a_ptr, rows64, t, valid, s * Q + offs_o, o_ok, L, C)
            src = t + (j - PAD)
            src_ok = frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
            x_rows = x_ptr + (rows64 * L + src) * C + s * Q
            xs = tl.load(x_rows[:, None] + offs_i[None, :], mask=src_ok[:, None] & i_ok[None, :], other=0.0)
            acc += tl.dot(tl.trans(dy.to(DOT_DTYPE)), xs.to(DOT_DTYPE), input_precision="ieee")
            db += tl.sum(dy, axis=0)
    w_out = dw_ptr + pid_p.to(tl.int64) * TOTAL_W + Q * Q * tap                # partials: [P, 24 taps, Q_in, Q_out]
    tl.store(w_out + offs_i[None, :] * Q + offs_o[:, None], acc, mask=o_ok[:, None] & i_ok[None, :])
    if (j == 0) & (ib == 0):
        tl.store(db_ptr + pid_p.to(tl.int64) * C + s * Q + offs_o, db, mask=o_ok)


@triton.jit
def sum_over_rows(a_ptr, lda, offs_a, a_ok, b_ptr, ldb, offs_b, b_ok, N, BLOCK_R: tl.constexpr):
    """(sum_n A[n, offs_a]^T B[n, offs_b], sum_n A[n, offs_a]) over all N rows in a fixed order (fp32)."""
    acc = tl.zeros((offs_a.shape[0], offs_b.shape[0]), tl.float32)
    col_sum = tl.zeros((offs_a.shape[0],), tl.float32)
    for r0 in range(0, N, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rows < N
        a = tl.load(a_ptr + rows[:, None] * lda + offs_a[None, :], mask=r_ok[:, None] & a_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * ldb + offs_b[None, :], mask=r_ok[:, None] & b_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        col_sum += tl.sum(a, axis=0)
    return acc, col_sum


@triton.jit
def weighted_col_sum(a_ptr, lda, offs_a, a_ok, weight_ptr, N, BLOCK_R: tl.constexpr):
    """sum_n weight[n] A[n, offs_a] over all N rows in a fixed order (fp32)."""
    col_sum = tl.zeros((offs_a.shape[0],), tl.float32)
    for r0 in range(0, N, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rows < N
        a = tl.load(a_ptr + rows[:, None] * lda + offs_a[None, :], mask=r_ok[:, None] & a_ok[None, :], other=0.0)
        col_sum += tl.sum(a * tl.load(weight_ptr + rows, mask=r_ok, other=0.0)[:, None], axis=0)
    return col_sum


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=PRUNE)
@triton.jit
def _psa_param_grad_kernel(a_ptr, s_ptr, frames_ptr, dw_part_ptr, db_part_ptr, dpre1_ptr, z_ptr, dpre2_ptr, h_ptr,
                           dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr, db0_ptr, db1_ptr, db2_ptr, db3_ptr,
                           dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr, N, C, Q, PARTS, POOL: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grid (24 taps x output-channel blocks x input-channel blocks + C / BLOCK_C channel blocks).
    Conv programs: one [o, i] tile of one tap j of branch s, stored as dW_s[o, i, j]; at j = 0 and the
    first input block also db_s. psa_pool (POOL): dW = sum_n a^T S_j, db = sum_n V a (a = dz / cnt,
    S = window sums, V = valid frames); psa: the sum of the conv_dw kernel's P partials, in order.
    SE programs: columns c of d fc1_w = dpre1^T z and rows c of d fc2_w = dpre2^T h, and the biases."""
    pid = tl.program_id(0)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    conv_programs = TAPS_CONST * num_qb * num_qb
    if pid < conv_programs:
        tap = pid // (num_qb * num_qb)
        ib = pid % num_qb
        s, j = tap_branch(tap)
        offs_o = (pid // num_qb) % num_qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        o_ok = offs_o < Q
        offs_i = ib * BLOCK_Q + tl.arange(0, BLOCK_Q)
        i_ok = offs_i < Q
        if POOL:                                                             # one GEMM over all rows
            dw, _ = sum_over_rows(a_ptr, C, s * Q + offs_o, o_ok, s_ptr, TAPS_CONST * Q, tap * Q + offs_i, i_ok, N,
                                  BLOCK_R)
        else:                                                                # the P partials, in order
            dw = tl.zeros((BLOCK_Q, BLOCK_Q), tl.float32)
            for p in range(0, PARTS):
                part = dw_part_ptr + (p * TAPS_CONST + tap) * Q * Q              # partial p, tap: [Q_in, Q_out]
                dw += tl.load(part + offs_i[None, :] * Q + offs_o[:, None], mask=o_ok[:, None] & i_ok[None, :],
                              other=0.0)
        K = 2 * s + 3
        dw_ptr = branch_pointer(s, dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr)         # dW_s[o, i, j] at (o Q + i) K + j
        tl.store(dw_ptr + (offs_o[:, None] * Q + offs_i[None, :]) * K + j, dw.to(dw_ptr.dtype.element_ty),
                 mask=o_ok[:, None] & i_ok[None, :])
        if (j == 0) & (ib == 0):
            if POOL:
                db = weighted_col_sum(a_ptr + s * Q, C, offs_o, o_ok, frames_ptr, N, BLOCK_R)
            else:
                db = tl.zeros((BLOCK_Q,), tl.float32)
                for p in range(0, PARTS):
                    db += tl.load(db_part_ptr + p * C + s * Q + offs_o, mask=o_ok, other=0.0)
            db_ptr = branch_pointer(s, db0_ptr, db1_ptr, db2_ptr, db3_ptr)
            tl.store(db_ptr + offs_o, db.to(db_ptr.dtype.element_ty), mask=o_ok)
    else:
        cb = pid - conv_programs
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < Q
        d_fc1, d_fc1_b = sum_over_rows(dpre1_ptr, Q, offs_h, h_ok, z_ptr, C, offs_c, c_ok, N, BLOCK_R)  # [H, c]
        tl.store(dfc1w_ptr + offs_h[:, None] * C + offs_c[None, :], d_fc1.to(dfc1w_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & c_ok[None, :])
        if cb == 0:
            tl.store(dfc1b_ptr + offs_h, d_fc1_b.to(dfc1b_ptr.dtype.element_ty), mask=h_ok)
        d_fc2, d_fc2_b = sum_over_rows(dpre2_ptr, C, offs_c, c_ok, h_ptr, Q, offs_h, h_ok, N, BLOCK_R)  # [c, H]
        tl.store(dfc2w_ptr + offs_c[:, None] * Q + offs_h[None, :], d_fc2.to(dfc2w_ptr.dtype.element_ty),
                 mask=c_ok[:, None] & h_ok[None, :])
        tl.store(dfc2b_ptr + offs_c, d_fc2_b.to(dfc2b_ptr.dtype.element_ty), mask=c_ok)


def se_backward(grad, y, z, h, g, fc1_w, fc2_w, mask, has_mask, length, pool: bool):
    """SE backward. grad: d out [N, L, C] with y (psa) or d pool [N, C] (psa_pool, any strides).
    Returns a = dz / cnt [N, C], dpre1 [N, Q], dpre2 [N, C] and, for psa_pool, the valid frames per
    row [N] (else None), all fp32."""
    n, c = z.shape
    q = c // BRANCHES
    f32 = torch.float32
    if pool:
        dg = grad
    else:
        dg = empty((n, c), z, f32)
        _psa_gate_grad_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                            triton.cdiv(c, meta["BLOCK_C"]))](
            grad, y, mask, dg, n, length, c, HAS_MASK=has_mask)
    dpre2 = empty((n, c), z, f32)
    dpre1 = empty((n, q), z, f32)
    a = empty((n, c), z, f32)
    frames = empty((n,), z, f32) if pool else None
    _psa_se_bwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)](
        dg, z, h, g, mask, fc1_w.contiguous(), fc2_w.contiguous(), dpre2, dpre1, a, frames if pool else a,
        n, length, c, q, dg.stride(0), dg.stride(1), POOL=pool, HAS_MASK=has_mask, BLOCK_H=block_h(q))
    return a, dpre1, dpre2, frames


def param_grads(weights, fc1_w, fc2_w, z, h, a, dpre1, dpre2, sums=None, frames=None, partials=None):
    """The 4 dW, 4 db and 4 fc gradients (parameter dtypes and layouts) in one launch: psa_pool passes
    its window sums and frame counts, psa the conv_dw kernel's (dW, db) partials."""
    n, c = z.shape
    q = c // BRANCHES
    d_weights = [empty(w.shape, w) for w in weights]
    d_biases = [empty((q,), w) for w in weights]
    fc_grads = [empty(fc1_w.shape, fc1_w), empty((q,), fc1_w), empty(fc2_w.shape, fc2_w), empty((c,), fc2_w)]
    pool = sums is not None
    dw_part, db_part = (a, a) if pool else partials            # unused pointers: any tensor
    bq = block_q(q)
    conv_programs = TAPS * triton.cdiv(q, bq) ** 2
    _psa_param_grad_kernel[lambda meta: (conv_programs + triton.cdiv(c, meta["BLOCK_C"]),)](
        a, sums if pool else a, frames if pool else a, dw_part, db_part, dpre1, z, dpre2, h, *d_weights,
        *d_biases, *fc_grads, n, c, q, 1 if pool else dw_part.shape[0], POOL=pool, BLOCK_Q=bq, BLOCK_H=block_h(q))
    return d_weights, d_biases, fc_grads


def psa_backward(grad, x, y, z, h, g, weights, fc1_w, fc2_w, frame_mask):
    """psa's backward from d out [N, L, C]. Returns the 13 input gradients:
    dx, dW x4, db x4, d fc1_w, d fc1_b, d fc2_w, d fc2_b (dtypes of the inputs)."""
    x = x.contiguous()
    grad = grad.contiguous()    # a copy only if the gradient is not (strided loads cost the conv kernels registers)
    n, length, c = x.shape
    q = c // BRANCHES
    f32 = torch.float32
    mask, has_mask = mask_arg(x, frame_mask)
    a, dpre1, dpre2, _ = se_backward(grad, y.contiguous(), z, h, g, fc1_w, fc2_w, mask, has_mask, length, pool=False)

    weights = branch_args(weights)
    bq = block_q(q)
    nqb = triton.cdiv(q, bq)
    dx = empty(x.shape, x)
    _psa_conv_dx_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]), BRANCHES * nqb)](
        grad, g, a, mask, *weights, dx, n, length, c, q,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    rows_per_prog = triton.cdiv(n, min(n, max_partials()))
    parts = triton.cdiv(n, rows_per_prog)
    total_w = TAPS * q * q
    dw_part = empty((parts, total_w), x, f32)
    db_part = empty((parts, c), x, f32)
    _psa_conv_dw_kernel[(TAPS * nqb * nqb, parts)](
        grad, g, a, mask, x, dw_part, db_part, n, length, c, q, rows_per_prog, total_w,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    d_weights, d_biases, fc_grads = param_grads(weights, fc1_w, fc2_w, z, h, a, dpre1, dpre2,
                                                partials=(dw_part, db_part))
    return (dx, *d_weights, *d_biases, *fc_grads)
