"""The SE and parameter-gradient stages of PSA, shared by psa and psa_pool (DESIGN.md §3, §4.1).

Forward:  z = squeeze [N, C] (fp32, from the branch kernels) -> h = relu(fc1 z), g = sigmoid(fc2 h);
          for psa_pool also g * z (= the masked mean of psa's output).
Backward (dg = d gate: psa's gate-gradient row sums, or dpool * z for psa_pool, where z also gets dpool * g):
          dpre2 = dg * g * (1 - g);  dh = dpre2 @ fc2_w;  dpre1 = dh * (h > 0);  dz = dpre1 @ fc1_w
          a = dz / cnt (cnt = max(valid frames, 1)): the branch-output gradient is m * (dout * g + a).
Kernels (one launch each):
  _psa_se_fwd_kernel     grid (row blocks). SE MLP (fp32); POOL: also writes g * z.
  _psa_se_bwd_kernel     grid (row blocks). dpre2, dpre1, a (fp32); the frame counts come from the mask.
  _psa_param_grad_kernel every parameter gradient in its parameter's own layout and dtype: the conv
                         dW / db (psa: the sum of the conv_dw kernel's P partials, in order; psa_pool:
                         sum_n a^T S from its window sums) and the SE fc gradients dpre1^T z, dpre2^T h
                         and column sums. One program per output tile, summing over all rows in a fixed
                         order: a deterministic reduction without atomics.
The SE MLP is a separate small kernel rather than fused into the conv kernel: the gate of a row
needs the squeeze of all four branches, which live in four different programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, prune_by
from ._psa_common import BRANCHES, SE_CONFIGS, TAPS, _branch_pointer, _count_valid_frames, _tap_branch, block_h, block_q


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=prune_by())
@triton.jit
def _psa_se_fwd_kernel(z_ptr, fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, h_ptr, g_ptr, pool_ptr, N, C, Q,
                       POOL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < Q
    pre1 = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        z = tl.load(z_ptr + rows64[:, None] * C + cc[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        w1t = tl.load(fc1w_ptr + offs_h[None, :] * C + cc[:, None], mask=c_ok[:, None] & h_ok[None, :],
                      other=0.0).to(tl.float32)                                     # fc1_w[h, c] as [C, H]
        pre1 += tl.dot(z, w1t, input_precision="ieee")
    b1 = tl.load(fc1b_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    h = tl.maximum(pre1 + b1[None, :], 0.0)
    tl.store(h_ptr + rows64[:, None] * Q + offs_h[None, :], h, mask=r_ok[:, None] & h_ok[None, :])
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        ok2 = r_ok[:, None] & c_ok[None, :]
        w2t = tl.load(fc2w_ptr + cc[None, :] * Q + offs_h[:, None], mask=h_ok[:, None] & c_ok[None, :],
                      other=0.0).to(tl.float32)                                     # fc2_w[c, h] as [H, C]
        b2 = tl.load(fc2b_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        g = tl.sigmoid(tl.dot(h, w2t, input_precision="ieee") + b2[None, :])
        tl.store(g_ptr + rows64[:, None] * C + cc[None, :], g, mask=ok2)
        if POOL:
            z = tl.load(z_ptr + rows64[:, None] * C + cc[None, :], mask=ok2, other=0.0)
            tl.store(pool_ptr + rows64[:, None] * C + cc[None, :], (g * z).to(pool_ptr.dtype.element_ty),
                     mask=ok2)


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=prune_by())
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
    valid = _count_valid_frames(mask_ptr, rows64, r_ok, L, HAS_MASK, 16)
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


@triton.jit
def _sum_over_rows(a_ptr, lda, offs_a, a_ok, b_ptr, ldb, offs_b, b_ok, N, BLOCK_R: tl.constexpr):
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
def _weighted_col_sum(a_ptr, lda, offs_a, a_ok, weight_ptr, N, BLOCK_R: tl.constexpr):
    """sum_n weight[n] A[n, offs_a] over all N rows in a fixed order (fp32)."""
    col_sum = tl.zeros((offs_a.shape[0],), tl.float32)
    for r0 in range(0, N, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rows < N
        a = tl.load(a_ptr + rows[:, None] * lda + offs_a[None, :], mask=r_ok[:, None] & a_ok[None, :], other=0.0)
        col_sum += tl.sum(a * tl.load(weight_ptr + rows, mask=r_ok, other=0.0)[:, None], axis=0)
    return col_sum


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=prune_by())
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
    conv_programs = TAPS * num_qb * num_qb
    if pid < conv_programs:
        tap = pid // (num_qb * num_qb)
        ib = pid % num_qb
        s, j = _tap_branch(tap)
        offs_o = (pid // num_qb) % num_qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        o_ok = offs_o < Q
        offs_i = ib * BLOCK_Q + tl.arange(0, BLOCK_Q)
        i_ok = offs_i < Q
        if POOL:                                                             # one GEMM over all rows
            dw, _ = _sum_over_rows(a_ptr, C, s * Q + offs_o, o_ok, s_ptr, TAPS * Q, tap * Q + offs_i, i_ok, N,
                                   BLOCK_R)
        else:                                                                # the P partials, in order
            dw = tl.zeros((BLOCK_Q, BLOCK_Q), tl.float32)
            for p in range(0, PARTS):
                part = dw_part_ptr + (p * TAPS + tap) * Q * Q                    # partial p, tap: [Q_in, Q_out]
                dw += tl.load(part + offs_i[None, :] * Q + offs_o[:, None], mask=o_ok[:, None] & i_ok[None, :],
                              other=0.0)
        K = 2 * s + 3
        dw_ptr = _branch_pointer(s, dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr)        # dW_s[o, i, j] at (o Q + i) K + j
        tl.store(dw_ptr + (offs_o[:, None] * Q + offs_i[None, :]) * K + j, dw.to(dw_ptr.dtype.element_ty),
                 mask=o_ok[:, None] & i_ok[None, :])
        if (j == 0) & (ib == 0):
            if POOL:
                db = _weighted_col_sum(a_ptr + s * Q, C, offs_o, o_ok, frames_ptr, N, BLOCK_R)
            else:
                db = tl.zeros((BLOCK_Q,), tl.float32)
                for p in range(0, PARTS):
                    db += tl.load(db_part_ptr + p * C + s * Q + offs_o, mask=o_ok, other=0.0)
            db_ptr = _branch_pointer(s, db0_ptr, db1_ptr, db2_ptr, db3_ptr)
            tl.store(db_ptr + offs_o, db.to(db_ptr.dtype.element_ty), mask=o_ok)
    else:
        cb = pid - conv_programs
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < Q
        d_fc1, d_fc1_b = _sum_over_rows(dpre1_ptr, Q, offs_h, h_ok, z_ptr, C, offs_c, c_ok, N, BLOCK_R)  # [H, c]
        tl.store(dfc1w_ptr + offs_h[:, None] * C + offs_c[None, :], d_fc1.to(dfc1w_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & c_ok[None, :])
        if cb == 0:
            tl.store(dfc1b_ptr + offs_h, d_fc1_b.to(dfc1b_ptr.dtype.element_ty), mask=h_ok)
        d_fc2, d_fc2_b = _sum_over_rows(dpre2_ptr, C, offs_c, c_ok, h_ptr, Q, offs_h, h_ok, N, BLOCK_R)  # [c, H]
        tl.store(dfc2w_ptr + offs_c[:, None] * Q + offs_h[None, :], d_fc2.to(dfc2w_ptr.dtype.element_ty),
                 mask=c_ok[:, None] & h_ok[None, :])
        tl.store(dfc2b_ptr + offs_c, d_fc2_b.to(dfc2b_ptr.dtype.element_ty), mask=c_ok)



def se_fwd(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool: bool):
    """SE MLP on the squeeze z [N, C] (fp32) -> (h, g, g * z in x's dtype if pool else None)."""
    n, c = z.shape
    q = c // BRANCHES
    h = empty((n, q), x, torch.float32)
    g = empty((n, c), x, torch.float32)
    pooled = empty((n, c), x) if pool else None
    _psa_se_fwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)](
        z, fc1_w.contiguous(), fc1_b.contiguous(), fc2_w.contiguous(), fc2_b.contiguous(), h, g,
        pooled if pool else g, n, c, q, POOL=pool, BLOCK_H=block_h(q))
    return h, g, pooled


def se_bwd(dg, z, h, g, fc1_w, fc2_w, mask, has_mask, length, pool: bool):
    """SE backward from dg: psa's gate gradient [N, C] (fp32), or d pool [N, C] (psa_pool, x's dtype, any
    strides). Returns a = dz / cnt [N, C], dpre1 [N, Q], dpre2 [N, C] and, for psa_pool, the valid frames
    per row [N] (else None), all fp32."""
    n, c = z.shape
    q = c // BRANCHES
    f32 = torch.float32
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
    conv_programs = TAPS.value * triton.cdiv(q, bq) ** 2
    _psa_param_grad_kernel[lambda meta: (conv_programs + triton.cdiv(c, meta["BLOCK_C"]),)](
        a, sums if pool else a, frames if pool else a, dw_part, db_part, dpre1, z, dpre2, h, *d_weights,
        *d_biases, *fc_grads, n, c, q, 1 if pool else dw_part.shape[0], POOL=pool, BLOCK_Q=bq, BLOCK_H=block_h(q))
    return d_weights, d_biases, fc_grads
