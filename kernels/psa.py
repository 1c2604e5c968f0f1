"""Fused Pyramid Squeeze Attention, forward (DESIGN.md §3, §4.1).

x [N, L, C], Q = C/4 channels per branch s = 0..3, kernel K_s = 2s + 3, zero padding s + 1.
Every kernel reads the four conv weights (and biases) where they are, in their own [Q_out, Q_in, K_s]
layout: a program picks its branch's tensor (branch_pointer), so no packed copy is built per call
(it would cost device operations on every training step, as the optimizer updates the weights).

Kernels (one launch each; psa's forward is these three launches and no other device operation):
  _psa_conv_fwd_kernel   grid (row blocks, 4 branches x output-channel blocks). One pass over x:
                         the branch conv as K_s small matmuls tl.dot([frames, Q_in], W_j[Q_in, Q_out])
                         over shifted frame windows (input zeroed at padded frames), + bias; stores the
                         branch output y and the squeeze z = masked mean over frames (fp32).
  _psa_se_fwd_kernel     grid (row blocks). SE MLP h = relu(fc1 z), g = sigmoid(fc2 h) (fp32); for
                         psa_pool also writes g * z (= masked mean of psa's output).
  _psa_gate_apply_kernel grid (frame blocks, channel blocks). out = y * g * frame_mask.
psa_pool does not run the per-frame convolution at all (kernels/psa_pool.py): the squeeze is a
convolution of windowed sums of x, so it never materialises [N, L, C].
The SE MLP is a separate small kernel rather than fused into the conv kernel: the gate of a row
needs the squeeze of all four branches, which live in four different programs. Fusing the gate
into the conv pass would need one program per row holding [L, C] of y in registers (or a second
conv pass); not measured on a GPU — the split is the simple choice.

Tiles: a program covers BLOCK_N = BLOCK_M // BLOCK_L whole rows x BLOCK_L frames, flattened to
BLOCK_M matmul rows; per-row sums reshape [BLOCK_M, .] -> [BLOCK_N, BLOCK_L, .]. Longer rows loop
over frame tiles. fp32 dots use input_precision="ieee"; 16-bit inputs use 16-bit dot operands
with fp32 accumulation (under the interpreter bf16 operands are upcast: it cannot multiply bf16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BRANCHES = 4
TAPS = 3 + 5 + 7 + 9                 # taps of the four branches together (K_s = 3, 5, 7, 9)
TAPS_CONST = tl.constexpr(TAPS)      # the same, for use inside kernels


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def prune_first_in_interpreter(configs, named_args, **kwargs):
    # the autotuner's benchmark needs a GPU driver: the interpreter runs the first config only
    return configs[:1] if interpreting() else configs


def block_l(args):
    """Frames per tile: the row length rounded up to a power of two, at most BLOCK_M."""
    return min(triton.next_power_of_2(max(int(args["L"]), 1)), args["BLOCK_M"])


def block_l_rows16(args):
    """Frames per tile of kernels that matmul per-row sums ([BLOCK_N, .] dot operands): at most
    BLOCK_M // 16, so a tile holds >= 16 rows (the tl.dot minimum when compiled)."""
    return min(triton.next_power_of_2(max(int(args["L"]), 1)), args["BLOCK_M"] // 16)


def block_q(q: int) -> int:
    """Channels per dot operand block: >= 16 (tl.dot minimum when compiled), <= 64."""
    return min(max(16, triton.next_power_of_2(q)), 64)


def block_h(q: int) -> int:
    """The SE hidden width (Q) as one block, >= 16."""
    return max(16, triton.next_power_of_2(q))


# first config = the one the interpreter uses (large tiles: it costs per program x iteration)
# num_stages=1 for the large tiles: with 2 stages the fp32 backward kernels at BLOCK_M=256 need
# > 166912 bytes of shared memory (A100 limit); tests/test_psa_aot.py checks every config.
CONV_CONFIGS = [
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
]
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_C": 128}, num_warps=4, num_stages=1),
]
# the row-block kernels (SE forward / backward, parameter gradients): the fp32 dots of 64-wide blocks
# on 4 warps spilled registers on sm_90; 32-wide blocks on 8 warps do not
SE_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 32}, num_warps=8, num_stages=1),
]
PRUNE = {"early_config_prune": prune_first_in_interpreter}


POISON = False   # tests set it: buffers the kernels write start as NaN, so unwritten elements show


def empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Allocation of every buffer a kernel writes (NaN-filled when POISON is set)."""
    dtype = like.dtype if dtype is None else dtype
    if POISON:
        return torch.full(tuple(shape), float("nan"), device=like.device, dtype=dtype)
    return torch.empty(tuple(shape), device=like.device, dtype=dtype)


def dot_dtype(dtype: torch.dtype):
    if dtype == torch.float32:
        return tl.float32
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    raise TypeError(f"x: the Triton PSA kernels take float32/float16/bfloat16, got {dtype}")


@triton.jit
def frame_ok(mask_ptr, rows64, t, ok, L, HAS_MASK: tl.constexpr):
    """ok & frame_mask[row, t] (mask passed as uint8 [N, L])."""
    if HAS_MASK:
        m = tl.load(mask_ptr + rows64 * L + t, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def count_valid_frames(mask_ptr, rows64, row_ok, L, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Valid frames of each row, fp32 [rows] (L without a mask). Recomputed where needed from the
    uint8 mask (N x L bytes) rather than saved: it spares an output and the ATen ops that made it."""
    if HAS_MASK:
        count = tl.zeros(rows64.shape, tl.int32)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            m = tl.load(mask_ptr + rows64[:, None] * L + t[None, :], mask=row_ok[:, None] & (t < L)[None, :],
                        other=0)
            count += tl.sum((m != 0).to(tl.int32), axis=1)
        return count.to(tl.float32)
    else:
        return tl.zeros(rows64.shape, tl.float32) + L


@triton.jit
def branch_pointer(s, ptr0, ptr1, ptr2, ptr3):
    """The pointer of branch s (a runtime scalar) among the four branches' tensors."""
    ptr = ptr0
    if s == 1:
        ptr = ptr1
    elif s == 2:
        ptr = ptr2
    elif s == 3:
        ptr = ptr3
    return ptr


@triton.jit
def branch_tile(Q, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """Program coordinates of the frame-tiled kernels, grid (row blocks, 4 branches x channel blocks):
    the branch s, this program's channels of that branch, its first row, and for each of its BLOCK_M
    slots the row and the frame offset within the BLOCK_L-frame window."""
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    num_qb = tl.cdiv(Q, BLOCK_Q)
    s = tl.program_id(1) // num_qb
    offs_c = (tl.program_id(1) % num_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    return s, offs_c, row0, row0 + offs_m // BLOCK_L, offs_m % BLOCK_L


@triton.autotune(configs=CONV_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
@triton.heuristics({"BLOCK_L": block_l})
@triton.jit
def _psa_conv_fwd_kernel(x_ptr, mask_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                         y_ptr, z_ptr, N, L, C, Q, HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    s, offs_o, row0, rows, tt = branch_tile(Q, BLOCK_Q, BLOCK_M, BLOCK_L)
    K = 2 * s + 3
    PAD = s + 1
    w_ptr = branch_pointer(s, w0_ptr, w1_ptr, w2_ptr, w3_ptr)          # W[o, i, j] at (o Q + i) K + j
    o_ok = offs_o < Q
    offs_i = tl.arange(0, BLOCK_Q)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    bias = tl.load(branch_pointer(s, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    zsum = tl.zeros((BLOCK_N, BLOCK_Q), tl.float32)
    cnt = tl.zeros((BLOCK_N,), tl.float32)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tt
        acc = tl.zeros((BLOCK_M, BLOCK_Q), tl.float32)
        for j in range(0, K):
            src = t + (j - PAD)
            src_ok = frame_ok(mask_ptr, rows64, src, row_ok & (src >= 0) & (src < L), L, HAS_MASK)
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
        valid = frame_ok(mask_ptr, rows64, t, t_ok, L, HAS_MASK)
        ym = tl.where(valid[:, None], y, 0.0)
        zsum += tl.sum(tl.reshape(ym, (BLOCK_N, BLOCK_L, BLOCK_Q)), axis=1)
        cnt += tl.sum(tl.reshape(valid.to(tl.float32), (BLOCK_N, BLOCK_L)), axis=1)
    z = zsum / tl.maximum(cnt, 1.0)[:, None]
    zrows = row0 + tl.arange(0, BLOCK_N)
    tl.store(z_ptr + (zrows.to(tl.int64) * C + s * Q)[:, None] + offs_o[None, :], z,
             mask=(zrows < N)[:, None] & o_ok[None, :])


@triton.autotune(configs=SE_CONFIGS, key=["C"], prune_configs_by=PRUNE)
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


@triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["L", "C"], prune_configs_by=PRUNE)
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


def branch_args(tensors):
    """The four branches' tensors as kernel arguments (contiguous: a no-op for parameters)."""
    return [t.contiguous() for t in tensors]


def mask_arg(x, frame_mask):
    """(mask pointer argument, HAS_MASK): uint8 view of the bool mask, or x as an unused dummy."""
    if frame_mask is None:
        return x, False
    return frame_mask.contiguous().view(torch.uint8), True


def se_forward(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool: bool):
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


def psa_forward(x, weights, biases, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask):
    """psa's forward. Returns (out [N, L, C], y [N, L, C], z, h, g) (z, h, g fp32)."""
    x = x.contiguous()
    n, length, c = x.shape
    q = c // BRANCHES
    mask, has_mask = mask_arg(x, frame_mask)
    z = empty((n, c), x, torch.float32)
    y = empty(x.shape, x)
    bq = block_q(q)
    _psa_conv_fwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]),
                                       BRANCHES * triton.cdiv(q, bq))](
        x, mask, *branch_args(weights), *branch_args(biases), y, z, n, length, c, q,
        HAS_MASK=has_mask, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_Q=bq)
    h, g, _ = se_forward(z, fc1_w, fc1_b, fc2_w, fc2_b, x, pool=False)
    out = empty(x.shape, x)
    _psa_gate_apply_kernel[lambda meta: (triton.cdiv(n * length, meta["BLOCK_M"]),
                                         triton.cdiv(c, meta["BLOCK_C"]))](
        y, g, mask, out, n, length, c, HAS_MASK=has_mask)
    return out, y, z, h, g
