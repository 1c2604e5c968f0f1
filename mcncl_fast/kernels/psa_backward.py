"""Fused Pyramid Squeeze Attention, backward (DESIGN.md §3, §4.1). Forward: mcncl_fast/kernels/psa.py.

Math (m = frame mask, cnt = max(sum_t m, 1), y = branch output, g = gate, z = squeeze, h = SE hidden):
  psa:      out = m * y * g            dg = sum_t m * dout * y
  psa_pool: pool = g * z               dg = dpool * z,  and z gets dpool * g directly
            (psa_pool's branch backward is in mcncl_fast/kernels/psa_pool.py: no per-frame convolution)
  SE:       dpre2 = dg * g * (1 - g);  dh = dpre2 @ fc2_w;  dpre1 = dh * (h > 0);  dz = dpre1 @ fc1_w (+ dpool * g)
            a = dz / cnt
  branch:   dy = m * (dout * g + a)    (never materialised: each kernel rebuilds its tile from dout, g, a, m)
  conv:     dx[u, i] = m[u] * sum_j sum_o W[o, i, j] dy[u - j + pad, o]
            dW[o, i, j] = sum_{n, t} dy[t, o] x_m[t + j - pad, i],  db[o] = sum_{n, t} dy[t, o]

Kernels (psa's backward is these five launches; no ATen compute op):
  _psa_gate_grad_kernel  dg row sums, one pass over dout and y.
  _psa_se_bwd_kernel     (mcncl_fast/kernels/psa_se.py) per row block: dpre2, dpre1, a (fp32).
  _psa_conv_dx_kernel    transposed conv as K_s matmuls over shifted windows of dy.
  _psa_conv_dw_kernel    grid (24 taps x channel blocks, P row chunks): per-chunk partial dW (and db)
                         written to [P, ...] fp32 buffers (P depends only on N).
  _psa_param_grad_kernel (mcncl_fast/kernels/psa_se.py) every parameter gradient in its parameter's own layout and
                         dtype: the conv dW / db as the sum of the P partials, in order, and the SE fc
                         gradients. A deterministic reduction without atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, interpreting, prune_by
from ._psa_common import (BRANCHES, CONV_CONFIGS, ELEMENTWISE_CONFIGS, TAPS, _branch_tile,
                          _frame_ok, _tap_branch, block_l, block_q, branch_args, dot_dtype, mask_arg, rows_grid)
from .psa_se import param_grads, se_bwd


def max_partials() -> int:
    # row chunks of the dW reduction: enough programs for a GPU (x 24 taps); 2 in the interpreter,
    # which pays per program (2 still exercises the two-stage sum)
    return 2 if interpreting() else 32


@triton.jit
def _dy_tile(dout_ptr, g_ptr, a_ptr, rows64, t, valid, ch, ch_ok, L, C):
    """dy[row, t, ch] = m * (dout * g + a) as fp32 [rows, ch]; 0 where not valid."""
    ok2 = valid[:, None] & ch_ok[None, :]
    per_row = rows64[:, None] * C + ch[None, :]
    do = tl.load(dout_ptr + ((rows64 * L + t) * C)[:, None] + ch[None, :], mask=ok2, other=0.0).to(tl.float32)
    return tl.load(a_ptr + per_row, mask=ok2, other=0.0) + do * tl.load(g_ptr + per_row, mask=ok2, other=0.0)


@triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
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
        valid = _frame_ok(mask_ptr, rows64, t, row_ok & (t < L), L, HAS_MASK)
        ok2 = valid[:, None] & c_ok[None, :]
        offs = ((rows64 * L + t) * C)[:, None] + cc[None, :]
        d = tl.load(dout_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        acc += tl.sum(tl.reshape(d * y, (BLOCK_N, BLOCK_L, BLOCK_C)), axis=1)
    nrows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(dg_ptr + nrows.to(tl.int64)[:, None] * C + cc[None, :], acc,
             mask=(nrows < N)[:, None] & c_ok[None, :])


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_dx_kernel(dout_ptr, g_ptr, a_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, dx_ptr, N, L, C, Q,
                        HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    s, offs_i, _, rows, tt, K, PAD, w_ptr = _branch_tile(Q, w0_ptr, w1_ptr, w2_ptr, w3_ptr, BLOCK_Q,
                                                         BLOCK_M, BLOCK_L)
    i_ok = offs_i < Q
    offs_o = tl.arange(0, BLOCK_Q)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tt
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            src = t + (PAD - j)
            src_ok = _frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
            for o0 in range(0, Q, BLOCK_Q):
                co = o0 + offs_o
                o_ok = co < Q
                dy = _dy_tile(dout_ptr, g_ptr, a_ptr, rows64, src, src_ok, s * Q + co, o_ok, L, C)
                w = tl.load(w_ptr + (co[:, None] * Q + offs_i[None, :]) * K + j,
                            mask=o_ok[:, None] & i_ok[None, :], other=0.0)         # W[o, i, j] as [o, i]
                acc += tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision="ieee")
        t_ok = row_ok & (t < L)
        valid = _frame_ok(mask_ptr, rows64, t, t_ok, L, HAS_MASK)
        dx = tl.where(valid[:, None], acc, 0.0)
        dx_rows = dx_ptr + (rows64 * L + t) * C + s * Q
        tl.store(dx_rows[:, None] + offs_i[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & i_ok[None, :])


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=prune_by())
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
    s, j = _tap_branch(tap)
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
            valid = _frame_ok(mask_ptr, rows64, t, row_ok & (t < L), L, HAS_MASK)
            dy = _dy_tile(dout_ptr, g_ptr, a_ptr, rows64, t, valid, s * Q + offs_o, o_ok, L, C)
            src = t + (j - PAD)
            src_ok = _frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
            x_rows = x_ptr + (rows64 * L + src) * C + s * Q
            xs = tl.load(x_rows[:, None] + offs_i[None, :], mask=src_ok[:, None] & i_ok[None, :], other=0.0)
            acc += tl.dot(tl.trans(dy.to(DOT_DTYPE)), xs.to(DOT_DTYPE), input_precision="ieee")
            db += tl.sum(dy, axis=0)
    w_out = dw_ptr + pid_p.to(tl.int64) * TOTAL_W + Q * Q * tap                # partials: [P, 24 taps, Q_in, Q_out]
    tl.store(w_out + offs_i[None, :] * Q + offs_o[:, None], acc, mask=o_ok[:, None] & i_ok[None, :])
    if (j == 0) & (ib == 0):
        tl.store(db_ptr + pid_p.to(tl.int64) * C + s * Q + offs_o, db, mask=o_ok)


def psa_bwd(grad, x, y, z, h, g, weights, fc1_w, fc2_w, frame_mask):
    """psa's backward from d out [N, L, C]. Returns the 13 input gradients:
    dx, dW x4, db x4, d fc1_w, d fc1_b, d fc2_w, d fc2_b (dtypes of the inputs)."""
    x = x.contiguous()
    grad = grad.contiguous()    # a copy only if the gradient is not (strided loads cost the conv kernels registers)
    n, length, c = x.shape
    q = c // BRANCHES
    f32 = torch.float32
    mask, has_mask = mask_arg(x, frame_mask)
    dg = empty((n, c), z, f32)
    _psa_gate_grad_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                        triton.cdiv(c, meta["BLOCK_C"]))](
        grad, y.contiguous(), mask, dg, n, length, c, HAS_MASK=has_mask)
    a, dpre1, dpre2, _ = se_bwd(dg, z, h, g, fc1_w, fc2_w, mask, has_mask, length, pool=False)

    weights = branch_args(weights)
    bq = block_q(q)
    nqb = triton.cdiv(q, bq)
    dx = empty(x.shape, x)
    _psa_conv_dx_kernel[rows_grid(n, q)](
        grad, g, a, mask, *weights, dx, n, length, c, q,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    rows_per_prog = triton.cdiv(n, min(n, max_partials()))
    parts = triton.cdiv(n, rows_per_prog)
    total_w = TAPS.value * q * q
    dw_part = empty((parts, total_w), x, f32)
    db_part = empty((parts, c), x, f32)
    _psa_conv_dw_kernel[(TAPS.value * nqb * nqb, parts)](
        grad, g, a, mask, x, dw_part, db_part, n, length, c, q, rows_per_prog, total_w,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    d_weights, d_biases, fc_grads = param_grads(weights, fc1_w, fc2_w, z, h, a, dpre1, dpre2,
                                                partials=(dw_part, db_part))
    return (dx, *d_weights, *d_biases, *fc_grads)
