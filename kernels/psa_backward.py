"""Fused Pyramid Squeeze Attention, backward (DESIGN.md §3, §4.1; issue #5). Forward: kernels/psa.py.

Math (m = frame mask, cnt = max(sum_t m, 1), y = branch output, g = gate, z = squeeze, h = SE hidden):
  psa:      out = m * y * g            dg = sum_t m * dout * y
  psa_pool: pool = g * z               dg = dpool * z,  and z gets dpool * g directly
            (psa_pool's branch backward is in kernels/psa_pool.py: no per-frame convolution)
  SE:       dpre2 = dg * g * (1 - g);  dh = dpre2 @ fc2_w;  dpre1 = dh * (h > 0);  dz = dpre1 @ fc1_w (+ dpool * g)
            a = dz / cnt
  branch:   dy = m * (dout * g + a)    (never materialised: each kernel rebuilds its tile from dout, g, a, m)
  conv:     dx[u, i] = m[u] * sum_j sum_o W[o, i, j] dy[u - j + pad, o]
            dW[o, i, j] = sum_{n, t} dy[t, o] x_m[t + j - pad, i],  db[o] = sum_{n, t} dy[t, o]

Kernels:
  _psa_gate_grad_kernel  (psa only) dg row sums, one pass over dout and y.
  _psa_se_bwd_kernel     per row block: dpre2, dpre1, a (fp32). The fc weight/bias gradients are then
                         dpre2^T h, dpre1^T z and column sums: plain GEMMs / sums over [N, .] in the
                         launcher (deterministic; no atomics).
  _psa_conv_dx_kernel    transposed conv as K_s matmuls over shifted windows of dy.
  _psa_conv_dw_kernel    grid (24 taps x channel blocks, P row chunks): per-chunk partial dW (and db)
                         written to [P, ...] fp32 buffers, summed over P afterwards: a deterministic
                         two-stage reduction (P depends only on N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .psa import (BRANCHES, CONV_CONFIGS, ELEMENTWISE_CONFIGS, PRUNE, SE_CONFIGS, block_h, block_l, block_q,
                  branch_tile, dot_dtype, empty, frame_ok, interpreting, mask_arg, pack_conv)

TAPS = 3 + 5 + 7 + 9


def max_partials() -> int:
    # row chunks of the dW reduction: enough programs for a GPU (x 24 taps); 2 in the interpreter,
    # which pays per program (2 still exercises the two-stage sum)
    return 2 if interpreting() else 32


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
def _psa_se_bwd_kernel(dg_ptr, z_ptr, h_ptr, g_ptr, cnt_ptr, fc1w_ptr, fc2w_ptr, dpre2_ptr, dpre1_ptr, a_ptr,
                       N, C, Q, POOL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """POOL: dg_ptr holds dpool (x dtype); else dg (fp32)."""
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
        dg = tl.load(dg_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
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
    cnt = tl.load(cnt_ptr + rows, mask=r_ok, other=1.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        ok2 = r_ok[:, None] & c_ok[None, :]
        offs = rows64[:, None] * C + cc[None, :]
        w1 = tl.load(fc1w_ptr + offs_h[:, None] * C + cc[None, :], mask=h_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)                                      # fc1_w [H, C]
        dz = tl.dot(dpre1, w1, input_precision="ieee")
        if POOL:
            dpool = tl.load(dg_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
            dz += dpool * tl.load(g_ptr + offs, mask=ok2, other=0.0)
        tl.store(a_ptr + offs, dz / cnt[:, None], mask=ok2)


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_dx_kernel(dout_ptr, g_ptr, a_ptr, mask_ptr, w_ptr, dx_ptr, N, L, C, Q,
                        HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    s, offs_i, _, rows, tt = branch_tile(Q, BLOCK_Q, BLOCK_M, BLOCK_L)
    K = 2 * s + 3
    PAD = s + 1
    w_base = w_ptr + Q * Q * s * (s + 2)
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
                w = tl.load(w_base + j * Q * Q + offs_i[None, :] * Q + co[:, None],
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
    s = (tap >= 3).to(tl.int32) + (tap >= 8).to(tl.int32) + (tap >= 15).to(tl.int32)
    PAD = s + 1
    j = tap - s * (s + 2)
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
    w_out = dw_ptr + pid_p.to(tl.int64) * TOTAL_W + Q * Q * s * (s + 2)
    tl.store(w_out + j * Q * Q + offs_i[None, :] * Q + offs_o[:, None], acc, mask=o_ok[:, None] & i_ok[None, :])
    if (j == 0) & (ib == 0):
        tl.store(db_ptr + pid_p.to(tl.int64) * C + s * Q + offs_o, db, mask=o_ok)


def se_backward(grad, y, z, h, g, cnt, fc1_w, fc2_w, mask, has_mask, pool: bool):
    """SE backward. grad: d out [N, L, C] with y (psa) or d pool [N, C] (psa_pool).
    Returns a = dz / cnt [N, C] fp32 and the fc gradients (d fc1_w, d fc1_b, d fc2_w, d fc2_b)."""
    n, c = z.shape
    q = c // BRANCHES
    f32 = torch.float32
    if pool:
        dg = grad
    else:
        length = y.shape[1]
        dg = empty((n, c), z, f32)
        _psa_gate_grad_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                            triton.cdiv(c, meta["BLOCK_C"]))](
            grad, y, mask, dg, n, length, c, HAS_MASK=has_mask)
    dpre2 = empty((n, c), z, f32)
    dpre1 = empty((n, q), z, f32)
    a = empty((n, c), z, f32)
    _psa_se_bwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)](
        dg, z, h, g, cnt, fc1_w.contiguous(), fc2_w.contiguous(), dpre2, dpre1, a, n, c, q,
        POOL=pool, BLOCK_H=block_h(q))
    # SE parameter gradients: deterministic GEMMs / column sums over the rows
    fc_grads = ((dpre1.t() @ z).to(fc1_w.dtype), dpre1.sum(dim=0).to(fc1_w.dtype),
                (dpre2.t() @ h).to(fc2_w.dtype), dpre2.sum(dim=0).to(fc2_w.dtype))
    return a, fc_grads


def psa_backward(grad, x, y, z, h, g, weights, fc1_w, fc2_w, frame_mask):
    """psa's backward from d out [N, L, C]. Returns the 13 input gradients:
    dx, dW x4, db x4, d fc1_w, d fc1_b, d fc2_w, d fc2_b (dtypes of the inputs)."""
    x = x.contiguous()
    grad = grad.contiguous()
    n, length, c = x.shape
    q = c // BRANCHES
    f32 = torch.float32
    mask, has_mask = mask_arg(x, frame_mask)
    if frame_mask is None:
        cnt = torch.full((n,), float(max(length, 1)), device=x.device, dtype=f32)
    else:
        cnt = frame_mask.sum(dim=1).clamp(min=1).to(f32)
    a, fc_grads = se_backward(grad, y.contiguous(), z, h, g, cnt, fc1_w, fc2_w, mask, has_mask, pool=False)

    w_packed, _ = pack_conv(weights, [w.new_empty(0) for w in weights])
    bq = block_q(q)
    nqb = triton.cdiv(q, bq)
    dx = empty(x.shape, x)
    _psa_conv_dx_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]), BRANCHES * nqb)](
        grad, g, a, mask, w_packed, dx, n, length, c, q,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    rows_per_prog = triton.cdiv(n, min(n, max_partials()))
    parts = triton.cdiv(n, rows_per_prog)
    total_w = w_packed.numel()
    dw_part = empty((parts, total_w), x, f32)
    db_part = empty((parts, c), x, f32)
    _psa_conv_dw_kernel[(TAPS * nqb * nqb, parts)](
        grad, g, a, mask, x, dw_part, db_part, n, length, c, q, rows_per_prog, total_w,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    dw_flat = dw_part.sum(dim=0)
    db = db_part.sum(dim=0).to(x.dtype)
    d_weights, d_biases, offset = [], [], 0
    for s, w in enumerate(weights):
        k = w.shape[-1]      # packed as [K, Q_in, Q_out]; a fresh contiguous copy (outputs must not alias)
        d_weights.append(dw_flat[offset:offset + w.numel()].view(k, q, q).permute(2, 1, 0).contiguous().to(w.dtype))
        d_biases.append(db[s * q:(s + 1) * q].clone())
        offset += w.numel()
    return (dx, *d_weights, *d_biases, *fc_grads)
