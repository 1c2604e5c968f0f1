"""Triton forward of the hard-negative SupCon loss (DESIGN.md §4.3, paper eq. 26).

One program = BM anchor rows of one modality. Similarities S = Z_I Z_J^T are recomputed tile by
tile with tl.dot (IEEE for float32, float32 accumulation for 16-bit) by ONE helper, `_sim_tile`,
used by every pass, so the selection, the hard mask and the denominator all see bit-identical
values. Nothing of size N x N is stored; per row the kernel writes theta, log D and the sum of
positive similarities (O(M·N)).

Exact selection of t_i = k_i-th largest negative similarity (ties at t_i all included):
work on the order-preserving uint32 key of the float32 similarity (-0.0 mapped to +0.0), keep a
bracket [lo, hi] of keys with count(key >= lo) >= k > count(key > hi), and narrow it with a
16-bin histogram of the keys inside the bracket (bins of width 2^shift, the counts of the 16
bins packed as 8-bit fields into two uint64 per row and tile, unpacked per tile):
  pass 1 (stats):  initial bracket = the keys of the side of 0 that holds t_i (from the count of
                   negatives >= 0): [min key >= +0, max key] or [0, max key < 0]; sum of
                   positives, row max
  passes 2..:      one histogram pass per 4 bits: lo moves to the highest bin whose suffix count
                   is still >= k; stops when lo == hi (lo is then t_i's key) or when
                   count(key >= lo) == k (then {key >= lo} is exactly the hard set)
  last pass:       D_i = sum over positives and negatives with key >= lo of exp(s/tau)
                   (shifted by the row max), plus t_i and the largest negative below it.
Bounded cost: every histogram pass removes 4 bits of the bracket width (the bins cover it, the
chosen bin is 1/16 of it) and a width of at most 2^32 - 1 keys is a single key after 8, so at
most 8 histogram passes: at most 10 passes over the similarity tiles in all, each recomputing
S = Z_I Z_J^T. A block stops as soon as all its rows are done, i.e. once lo separates the k-th
from the (k+1)-th largest; measured on random data (normalised, D = 128, 7 classes, r = 0.3),
histogram passes per program: mean 4.1 / max 5 at N = 300, mean 5.25 / max 6 at N = 1000, so
6-8 passes over the tiles. Exact duplicates at the threshold end with lo == hi. The number of
histogram passes each program ran is written to `passes`. (The backward is 1 pass: 2 GEMMs/tile.)

Saved threshold theta_i: a value in (t_i^-, t_i] (midpoint of t_i and the largest negative
below it; -inf if every negative is hard, +inf if there is none), so that a backward that
recomputes s_ij with a different summation order still classifies the threshold element.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

# (BM, BN) tiles, 8 warps: no register spills for sm_80 and sm_90 at every BK (ptxas -v on the
# AOT-compiled PTX, tests/test_supcon_aot.py; 128x64 and 64x128 spill). float32 (FMA dot, BK = 16)
# launches with BM = 64 only (128x32 spills on sm_80). The interpreter costs per program x loop
# iteration, so it gets big tiles.
GPU_CONFIGS = [
    triton.Config({"BM": 64, "BN": 64}, num_warps=8, num_stages=2),
    triton.Config({"BM": 128, "BN": 32}, num_warps=8, num_stages=2),
]
INTERPRETER_CONFIGS = [triton.Config({"BM": 128, "BN": 128}, num_warps=4, num_stages=1)]
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS
MAX_HIST_PASSES = 8


def block_k(d: int, dtype: torch.dtype) -> int:
    """The K tile (constexpr BK) the launcher uses for feature size d and dtype."""
    bk = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return bk
    # float32: FMA dot, small K tile; 16-bit: 32..64 (BK = 16 spills at 64x64 on sm_80)
    return 16 if dtype == torch.float32 else min(max(bk, 32), 64)


def configs_for(dtype: torch.dtype, configs=None):
    """The autotune configs launched for z of this dtype (float32: BM = 64 only)."""
    configs = CONFIGS if configs is None else configs
    if INTERPRET:
        return configs[:1]
    kept = [c for c in configs if dtype != torch.float32 or c.kwargs["BM"] == 64]
    return kept or configs[:1]


def _prune(configs, named_args, **kwargs):
    return configs_for(named_args["z_ptr"].dtype, configs)


@triton.jit
def _key(s):
    """Order-preserving uint32 key of float32 s; -0.0 and +0.0 get the same key."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.uint32, bitcast=True)
    top = tl.full(bits.shape, 1, tl.uint32) << 31
    return tl.where((bits >> 31) != 0, ~bits, bits | top)


@triton.jit
def _from_key(key):
    """float32 value of an order-preserving key (inverse of _key; +0.0 for the key of 0)."""
    top = tl.full(key.shape, 1, tl.uint32) << 31
    bits = tl.where((key >> 31) != 0, key & ~top, ~key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sim_tile(z_m, r0, c0, N, D, stride_n, stride_d, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr):
    """S[BM, BN] = Z[r0:r0+BM] Z[c0:c0+BN]^T in float32: the one place similarities are computed
    Every pass inlines this same code; the accumulation order is fixed by the dot's K loop, so the
    passes see bit-identical values (noinline would serialise the wgmma pipeline and spill)."""
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BK):
        dk = d0 + tl.arange(0, BK)
        a = tl.load(z_m + rows[:, None] * stride_n + dk[None, :] * stride_d,
                    mask=(rows[:, None] < N) & (dk[None, :] < D), other=0.0)
        b = tl.load(z_m + cols[None, :] * stride_n + dk[:, None] * stride_d,
                    mask=(cols[None, :] < N) & (dk[:, None] < D), other=0.0)
        if z_m.dtype.element_ty == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _masks(rows, cols, lab_i, lab_j, N):
    """Negatives and positives of anchors `rows` among `cols`; label -1 rows are neither."""
    valid = (rows[:, None] < N) & (cols[None, :] < N) & (lab_i[:, None] >= 0) & (lab_j[None, :] >= 0)
    same = lab_i[:, None] == lab_j[None, :]
    neg = valid & (same == 0)
    pos = valid & same & (rows[:, None] != cols[None, :])
    return neg, pos


@triton.autotune(configs=CONFIGS, key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def supcon_forward_kernel(z_ptr, labels_ptr, k_ptr, nneg_ptr, delta_ptr, theta_ptr, logd_ptr, possum_ptr,
                          passes_ptr, N, D, row_start, row_count, stride_m, stride_n, stride_d, inv_tau,
                          passes_stride, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    z_m = z_ptr + m.to(tl.int64) * stride_m
    r0 = row_start + pid * BM
    rows = r0 + tl.arange(0, BM)
    rmask = rows < row_start + row_count
    lab_i = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    k_i = tl.load(k_ptr + rows, mask=rmask, other=0)
    k_i = tl.where(lab_i >= 0, k_i, 0)
    nneg = tl.load(nneg_ptr + rows, mask=rmask, other=0)   # number of negatives of each anchor
    delta = tl.load(delta_ptr + m)

    # ---- pass 1: initial bracket (min / max negative key), positives, row max
    # keys below 2^31 are negative values, keys >= 2^31 are >= +0.0: the bracket starts on the
    # side of zero that holds t_i (one pass of bits saved: floats near 0 fill half the key space)
    # (few per-row accumulators: each costs registers in every thread holding the row)
    maxkey = tl.zeros((BM,), tl.uint32)                   # all negatives
    max_below0 = tl.zeros((BM,), tl.uint32)               # negatives with value < 0
    min_above0 = tl.full((BM,), 0xFFFFFFFF, tl.uint32)    # negatives with value >= 0
    n_above0 = tl.zeros((BM,), tl.int32)
    possum = tl.zeros((BM,), tl.float32)
    rowmax = tl.full((BM,), float("-inf"), tl.float32)
    for j0 in range(0, N, BN):
        cols = j0 + tl.arange(0, BN)
        lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
        s = _sim_tile(z_m, r0, j0, N, D, stride_n, stride_d, BM, BN, BK)
        neg, pos = _masks(rows, cols, lab_i, lab_j, N)
        key = _key(s)
        maxkey = tl.maximum(maxkey, tl.max(tl.where(neg, key, tl.zeros((BM, BN), tl.uint32)), axis=1))
        above0 = neg & ((key >> 31) != 0)
        below0 = neg & ((key >> 31) == 0)
        n_above0 += tl.sum(above0.to(tl.int32), axis=1)
        max_below0 = tl.maximum(max_below0, tl.max(tl.where(below0, key, tl.zeros((BM, BN), tl.uint32)), axis=1))
        min_above0 = tl.minimum(min_above0, tl.min(tl.where(above0, key, tl.full((BM, BN), 0xFFFFFFFF, tl.uint32)),
                                                   axis=1))
        possum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        rowmax = tl.maximum(rowmax, tl.max(tl.where(neg | pos, s, float("-inf")), axis=1))
    npass = 1

    # ---- passes 2..: 16-bin histogram narrowing of [lo, hi] in key space
    t_above0 = n_above0 >= k_i       # t_i >= 0: bracket [min key >= +0, max key], else [0, max key < 0]
    lo = tl.where(t_above0, min_above0, tl.zeros((BM,), tl.uint32))
    hi = tl.where(t_above0, maxkey, max_below0)
    c_lo = tl.where(t_above0, n_above0, nneg)      # count(key >= lo); invariant: count(key > hi) < k
    done = (k_i <= 0) | (c_lo == k_i) | (lo == hi)
    bins = tl.arange(0, 16)
    field = (tl.where(bins < 8, bins, bins - 8) * 8).to(tl.uint64)
    nhist = 0
    remaining = tl.sum((done == 0).to(tl.int32), axis=0)
    while remaining > 0:
        width = hi - lo
        shift = tl.zeros((BM,), tl.uint32)
        for bit in tl.static_range(28):
            shift += ((width >> (bit + 4)) != 0).to(tl.uint32)
        hist = tl.zeros((BM, 16), tl.int32)
        for j0 in range(0, N, BN):
            cols = j0 + tl.arange(0, BN)
            lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
            s = _sim_tile(z_m, r0, j0, N, D, stride_n, stride_d, BM, BN, BK)
            neg, pos = _masks(rows, cols, lab_i, lab_j, N)
            key = _key(s)
            inside = neg & (done[:, None] == 0) & (key >= lo[:, None]) & (key <= hi[:, None])
            bin_ = (key - lo[:, None]) >> shift[:, None]
            zero64 = tl.zeros((BM, BN), tl.uint64)
            one = tl.where(inside, tl.full((BM, BN), 1, tl.uint64) << ((bin_ & 7) * 8).to(tl.uint64), zero64)
            acc_a = tl.sum(tl.where(bin_ < 8, one, zero64), axis=1)
            acc_b = tl.sum(tl.where(bin_ < 8, zero64, one), axis=1)
            fa = (acc_a[:, None] >> field[None, :]) & 0xFF
            fb = (acc_b[:, None] >> field[None, :]) & 0xFF
            hist += tl.where(bins[None, :] < 8, fa, fb).to(tl.int32)
        # count(key >= lo + b * 2^shift) = c_lo - (number inside the bracket in bins < b)
        below = tl.cumsum(hist, axis=1) - hist
        cnt_ge = c_lo[:, None] - below
        best = tl.sum((cnt_ge >= k_i[:, None]).to(tl.int32), axis=1) - 1   # >= 0: bin 0 qualifies
        pick = bins[None, :] == best[:, None]
        new_c_lo = tl.sum(tl.where(pick, cnt_ge, 0), axis=1)
        new_lo64 = lo.to(tl.int64) + (best.to(tl.int64) << shift.to(tl.int64))
        new_hi64 = new_lo64 + (tl.full((BM,), 1, tl.int64) << shift.to(tl.int64)) - 1
        new_hi64 = tl.minimum(new_hi64, hi.to(tl.int64))
        lo = tl.where(done, lo, new_lo64.to(tl.uint32))
        hi = tl.where(done, hi, new_hi64.to(tl.uint32))
        c_lo = tl.where(done, c_lo, new_c_lo)
        done = done | (c_lo == k_i) | (lo == hi)
        nhist += 1
        # at most 8 passes: each one removes 4 bits of the bracket width (guard, never reached)
        remaining = tl.sum((done == 0).to(tl.int32), axis=0) * (nhist < 8).to(tl.int32)
    npass += nhist

    # ---- t pass (only where some row ended with count(key >= lo) == k and lo < hi): t_i is the
    # smallest negative with key >= lo; where lo == hi, lo is t_i's key
    has_k = k_i > 0
    t = _from_key(lo)
    if tl.sum((has_k & (lo != hi)).to(tl.int32), axis=0) > 0:
        t_min = tl.full((BM,), float("inf"), tl.float32)
        for j0 in range(0, N, BN):
            cols = j0 + tl.arange(0, BN)
            lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
            s = _sim_tile(z_m, r0, j0, N, D, stride_n, stride_d, BM, BN, BK)
            neg, pos = _masks(rows, cols, lab_i, lab_j, N)
            t_min = tl.minimum(t_min, tl.min(tl.where(neg & (_key(s) >= lo[:, None]), s, float("inf")), axis=1))
        t = tl.where(lo != hi, t_min, t)
        npass += 1

    # ---- last pass: denominator over positives and hard negatives (s >= t_i - delta)
    scale = inv_tau * 1.4426950408889634
    thr = tl.where(has_k, t - delta, float("inf"))
    sumexp = tl.zeros((BM,), tl.float32)
    t_hard = tl.full((BM,), float("inf"), tl.float32)      # smallest hard negative
    t_below = tl.full((BM,), float("-inf"), tl.float32)    # largest other negative
    for j0 in range(0, N, BN):
        cols = j0 + tl.arange(0, BN)
        lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
        s = _sim_tile(z_m, r0, j0, N, D, stride_n, stride_d, BM, BN, BK)
        neg, pos = _masks(rows, cols, lab_i, lab_j, N)
        hard = neg & (s >= thr[:, None])
        den = hard | pos
        sumexp += tl.sum(tl.where(den, tl.exp2((s - rowmax[:, None]) * scale), 0.0), axis=1)
        t_hard = tl.minimum(t_hard, tl.min(tl.where(hard, s, float("inf")), axis=1))
        t_below = tl.maximum(t_below, tl.max(tl.where(neg & (hard == 0), s, float("-inf")), axis=1))
    npass += 1
    logd = tl.where(sumexp > 0, rowmax * inv_tau + tl.log(tl.where(sumexp > 0, sumexp, 1.0)), 0.0)
    mid = 0.5 * tl.minimum(t_hard, 3.0e38) + 0.5 * tl.maximum(t_below, -3.0e38)
    mid = tl.where((mid > t_below) & (mid <= t_hard), mid, t_hard)
    theta = tl.where(has_k, tl.where(t_below == float("-inf"), float("-inf"), mid), float("inf"))
    out = m.to(tl.int64) * row_count + (rows - row_start)
    tl.store(theta_ptr + out, theta, mask=rmask)
    tl.store(logd_ptr + out, logd, mask=rmask)
    tl.store(possum_ptr + out, possum, mask=rmask)
    tl.store(passes_ptr + m * passes_stride + pid, npass)


def supcon_forward(z: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, nneg: torch.Tensor,
                   delta: torch.Tensor, temperature: float, row_start: int = 0, row_count=None, out=None):
    """Forward of anchors [row_start, row_start + row_count) of z [M, N, D] against all N rows.

    z: float32 / float16 / bfloat16, any strides. labels: int32 [N] class ids >= 0, or -1 for an
    ignored row (neither anchor nor candidate). k, nneg: int32 [N], the number of hard negatives
    and of negatives of each anchor (0 for ignored rows). delta: float32 [M], the tie tolerance of
    each modality (a negative is hard iff s >= t_i - delta_m, evaluated in float32).
    Returns (theta, logd, possum, passes): float32 [M, row_count] x 3 (`out` = preallocated buffers
    for them) and int32 [M, programs]: the passes over the similarity tiles each program made.
    """
    m, n, d = z.shape
    row_count = n - row_start if row_count is None else row_count
    if not (0 <= row_start and 0 <= row_count and row_start + row_count <= n):
        raise ValueError(f"row range [{row_start}, {row_start} + {row_count}) outside [0, {n})")
    if out is None:
        out = tuple(torch.empty(m, row_count, device=z.device, dtype=torch.float32) for _ in range(3))
    theta, logd, possum = out
    min_bm = min(c.kwargs["BM"] for c in configs_for(z.dtype))
    passes = torch.zeros(m, triton.cdiv(row_count, min_bm), device=z.device, dtype=torch.int32)
    if row_count == 0 or m == 0:
        return theta, logd, possum, passes

    def grid(meta):
        return (triton.cdiv(row_count, meta["BM"]), m)

    supcon_forward_kernel[grid](z, labels.contiguous(), k.contiguous(), nneg.contiguous(), delta.contiguous(),
                                theta, logd, possum, passes, n, d, row_start, row_count, z.stride(0),
                                z.stride(1), z.stride(2), 1.0 / temperature, passes.stride(0),
                                BK=block_k(d, z.dtype))
    bm = (supcon_forward_kernel.best_config or configs_for(z.dtype)[0]).kwargs["BM"]
    return theta, logd, possum, passes[:, :triton.cdiv(row_count, bm)]
