"""Pieces shared by the PSA kernel files (psa.py, psa_backward.py, psa_pool.py, psa_se.py; DESIGN.md §3).

x [N, L, C], Q = C/4 channels per branch s = 0..3, kernel K_s = 2s + 3, zero padding s + 1. Every
kernel reads the four conv weights (and biases) where they are, in their own [Q_out, Q_in, K_s]
layout: a program picks its branch's tensor (_branch_pointer), so no packed copy is built per call.
Here: the branch / tap constants, the autotune configs, the tile-size rules, the @triton.jit helpers
(frame mask, frame counts, branch and tap coordinates) and the launchers' argument helpers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

BRANCHES = 4
TAPS = tl.constexpr(3 + 5 + 7 + 9)     # taps of the four branches together (K_s = 3, 5, 7, 9); Python: TAPS.value

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


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype of the conv kernels for x's dtype (fp32 accumulation)."""
    if dtype == torch.float32:
        return tl.float32
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    raise TypeError(f"x: the Triton PSA kernels take float32/float16/bfloat16, got {dtype}")


# ------------------------------------------------------------------ @triton.jit helpers
@triton.jit
def _frame_ok(mask_ptr, rows64, t, ok, L, HAS_MASK: tl.constexpr):
    """ok & frame_mask[row, t] (mask passed as uint8 [N, L])."""
    if HAS_MASK:
        m = tl.load(mask_ptr + rows64 * L + t, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _count_valid_frames(mask_ptr, rows64, row_ok, L, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
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
def _branch_pointer(s, ptr0, ptr1, ptr2, ptr3):
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
def _branch_tile(Q, w0_ptr, w1_ptr, w2_ptr, w3_ptr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_L: tl.constexpr):
    """Program coordinates of the frame-tiled kernels, grid (row blocks, 4 branches x channel blocks):
    the branch s, this program's channels of that branch, its first row, for each of its BLOCK_M slots
    the row and the frame offset within the BLOCK_L-frame window; then the branch's kernel size K,
    its padding and its weights W[o, i, j] (at (o Q + i) K + j)."""
    BLOCK_N: tl.constexpr = BLOCK_M // BLOCK_L
    num_qb = tl.cdiv(Q, BLOCK_Q)
    s = tl.program_id(1) // num_qb
    offs_c = (tl.program_id(1) % num_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    w_ptr = _branch_pointer(s, w0_ptr, w1_ptr, w2_ptr, w3_ptr)
    return s, offs_c, row0, row0 + offs_m // BLOCK_L, offs_m % BLOCK_L, 2 * s + 3, s + 1, w_ptr


@triton.jit
def _tap_branch(tap):
    """(branch s, tap j) of the tap-th of the 24 taps; branch s's K_s = 2s + 3 taps start at s(s + 2)."""
    s = (tap >= 3).to(tl.int32) + (tap >= 8).to(tl.int32) + (tap >= 15).to(tl.int32)
    return s, tap - s * (s + 2)


# ------------------------------------------------------------------ launcher helpers
def branch_args(tensors):
    """The four branches' tensors as kernel arguments (contiguous: a no-op for parameters)."""
    return [t.contiguous() for t in tensors]


def mask_arg(x, frame_mask):
    """(mask pointer argument, HAS_MASK): uint8 view of the bool mask, or x as an unused dummy."""
    if frame_mask is None:
        return x, False
    return frame_mask.contiguous().view(torch.uint8), True


def rows_grid(n, q):
    """Grid of the frame-tiled kernels: (row blocks, 4 branches x channel blocks)."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"] // meta["BLOCK_L"]), BRANCHES * triton.cdiv(q, block_q(q)))
