"""Triton forward of the hard-negative SupCon loss (DESIGN.md §4.3, paper eq. 26).

A program = BM anchor rows of one modality against all N columns. The similarities
S = Z_I Z_J^T are recomputed tile by tile with tl.dot (IEEE for float32, float32 accumulation for
16-bit) by one helper, `_sim_tile` (mcncl_fast/kernels/supcon_passes.py), so every pass sees bit-identical
values; nothing N x N is stored. Per anchor: theta, log D and the sum of positive similarities.
t_i = the k_i-th largest negative similarity (exactly, on these values); a negative is hard iff
s >= t_i - delta (float32); D = sum of exp(s / tau) over the hard negatives and the positives.

Selection: per row a bracket [lo, hi] of values (uint32 keys, mcncl_fast/kernels/supcon_select.py) with
c_gt = count(s > hi) < k <= c_gt + c_in, c_in = count(s in [lo, hi]). Three kernels:
  _supcon_sample_kernel  the first bracket, from a sample: chunks of CHUNK = 32 columns spread over
      all N (N / 8 columns, at most 8192), each sorted; the quantiles at p -/+ 4 standard errors
      (p = k / nneg), interpolated and averaged over the chunks.
  _supcon_count_kernel   pass 1 and the counting passes. A counting pass bins every negative,
      b = trunc(min(fma(s, w, c0), 15)): 15 bins of equal value width over the bracket, 15 =
      above it, < 0 below (passes 3.. split the bracket's keys instead: a guaranteed 15-fold cut),
      counted in 4-bit fields of one uint64 per element summed over 8 columns of a thread, widened
      to bytes per tile and to int32 every 31 tiles. The bin holding the k-th largest becomes the
      bracket (its key range found by bisection with the same bin function, so counts and bracket
      agree whatever the rounding); if t_i is outside the sample's bracket, the part below / above
      it. Pass 1 also keeps the largest negative or positive (the exp shift), the smallest negative
      (t_i when k = nneg) and the sum of positives. Counting passes run while some row's bracket
      holds more than READY = 960 negatives; a bracket of one value is t_i.
  _supcon_final_kernel   the final pass: the positives and the negatives above hi add
      exp2(s log2(e) / tau - shift) to D; the distinct values in [lo - delta, hi] go, with their
      multiplicities, to a per-row candidate buffer (per tile, the largest value not yet taken, as
      often as the tile's rows have values there). t_i = the (k - c_gt)-th largest candidate
      (bisection on keys); the candidates >= t_i - delta complete D; theta = midpoint of the
      smallest hard negative and the largest other one. Where t_i is known (one-value bracket,
      k = nneg) the hard negatives are counted directly. More than CAP = 1024 distinct candidates:
      once more without the delta extension, then, if t_i - delta < lo, once more with t_i known.
Rows finish together: a program runs its passes while any of its rows is open.

`passes` = the sweeps over all N column tiles a program made (pass 1 also computes the sample's
columns before it: at most N / 8 of them). Bound: 2 value passes, then key passes (each leaves at
most 1/15 of the bracket's keys, plus one: 9 reach a single key from any bracket), then at most 3
final passes: 14. Typical: 2 (N <= 262144), 3 (N = 1048576); many exact ties need key passes
(benchmarks/supcon_selection_model.py; benchmarks/results/supcon-selection-passes.md).

Scratch: per-row state [8, M, rows] int32 between the kernels and candidate buffers [M, rows, CAP]
(values and multiplicities); the launcher, `supcon_fwd`, runs at most ROWS_PER_LAUNCH anchors per
launch. (The backward is the extension's: csrc/, mcncl_fast/ops/supcon.py.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, empty, interpreting, launch_configs, prune_by
from .supcon_passes import _count_pass, _final_pass, _masks, _sample_cols, _select, _sim_tile
from .supcon_select import (CAP, CHUNK, KEY_PASSES, READY, VALUE_PASSES, Z, _canonical, _from_key, _key, _narrow,
                            _quantile, _sort_desc, sample_chunks)

ROWS_PER_LAUNCH = 8192             # x CAP x 8 bytes of candidate buffers per modality

# The interpreter costs per program x loop iteration: big tiles. It runs the first config of a
# kernel's list (mcncl_fast/kernels/_common.py), which is this one for the three kernels and is never launched
# on a GPU.
INTERPRETER_CONFIG = triton.Config({"BM": 128, "BN": 128}, num_warps=4, num_stages=1)
# (BM, BN): 128 rows on 8 warps, i.e. two warpgroups of 64 rows: a row never spans two warpgroups,
# row reductions stay in a quad of lanes. configs_for picks one per launch.
GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 32}, num_warps=8, num_stages=2),
    triton.Config({"BM": 128, "BN": 16}, num_warps=8, num_stages=2),
    triton.Config({"BM": 128, "BN": 16}, num_warps=8, num_stages=1),
]
# the sample kernel: 64 rows on 4 warps (its sorts and, with float32 or a K loop, the dot's operands
# need the registers)
SAMPLE_CONFIGS = [triton.Config({"BM": 64, "BN": 32}, num_warps=4, num_stages=2)]
# the lists the kernels are autotuned over: the interpreter's config first, then the GPU ones
CONFIGS = [INTERPRETER_CONFIG, *GPU_CONFIGS]
SAMPLE_KERNEL_CONFIGS = [INTERPRETER_CONFIG, *SAMPLE_CONFIGS]


def block_k(d: int, dtype: torch.dtype) -> int:
    """The K tile (constexpr BK) for feature size d: all of d (the anchor tile can stay resident,
    ONE_K) from 32 up to 128 for 16-bit inputs, else 64; float32 (FMA dot) 16."""
    bk = max(16, triton.next_power_of_2(d))
    if interpreting():
        return bk
    if dtype == torch.float32:
        return 16
    return max(bk, 32) if bk <= 128 else 64


def tile_options(z: torch.Tensor, d: int, bk: int):
    """(ONE_K, GROUPED): the anchor tile stays resident when one K tile holds d and the dot reads it
    from shared memory (wgmma, sm_90; mma.sync on sm_80 would hold it in registers); the grouped
    4-bit histogram counters (free reshape of a wgmma accumulator) with 16-bit inputs there."""
    one_k = d <= bk and _hopper(z)
    return one_k, one_k and z.dtype != torch.float32


def _gpu_configs(configs):
    return [c for c in configs if c is not INTERPRETER_CONFIG]


def _gpu_choice(configs, dtype, d, hopper, final):
    """On a GPU: 128 x 32 with 16-bit inputs whose anchor tile stays resident on sm_90, else 128 x 16
    (fewer elements per thread: no register spills with the K loop); float32 (FMA dot) 128 x 16, the
    counting kernel without software pipelining."""
    if dtype == torch.float32:
        want = (128, 16, 2 if final else 1)
    else:
        want = (128, 32 if hopper and d <= block_k(d, dtype) else 16, 2)
    match = [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_stages) == want]
    return match[:1] or _gpu_configs(configs)[:1]


def configs_for(dtype: torch.dtype, d: int = 128, hopper: bool = True, configs=None, final: bool = False):
    """[the config] a count (final: final-pass) launch takes: the interpreter's config under the
    interpreter, else the GPU choice (_gpu_choice)."""
    configs = CONFIGS if configs is None else configs
    return launch_configs(configs, lambda cs: _gpu_choice(cs, dtype, d, hopper, final))


def _hopper(t: torch.Tensor) -> bool:
    return interpreting() or not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] >= 9


def _prune(final: bool):
    def gpu_prune(configs, named_args, **kwargs):
        z = named_args["z_ptr"]
        return _gpu_choice(configs, z.dtype, named_args["D"], _hopper(z), final)
    return prune_by(gpu_prune)


# per-row state handed from kernel to kernel: int32 [STATE_FIELDS, M, rows] (floats as bits)
LO, HI, C_GT, T, KNOWN, SHIFT, POSSUM, NPASS = (tl.constexpr(i) for i in range(8))
STATE_FIELDS = 8


@triton.jit
def _rows(labels_ptr, k_ptr, nneg_ptr, z_m, row_start, row_count, D, stride_n, stride_d,
          BM: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr):
    """This program's anchors: index within the launch, rows, mask, labels, k, nneg, the resident tile."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = row_start + local
    rmask = local < row_count
    lab_i = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    k_i = tl.where(lab_i >= 0, tl.load(k_ptr + rows, mask=rmask, other=0), 0)
    nneg = tl.load(nneg_ptr + rows, mask=rmask, other=0)
    a = 0.0
    if ONE_K:                                             # anchor tile resident for all passes
        dk = tl.arange(0, BK)
        a = tl.load(z_m + rows[:, None] * stride_n + dk[None, :] * stride_d,
                    mask=rmask[:, None] & (dk[None, :] < D), other=0.0)
    return local, rows, rmask, lab_i, k_i, nneg, a


@triton.autotune(configs=SAMPLE_KERNEL_CONFIGS, key=["D"],
                 prune_configs_by=prune_by(lambda configs, named_args, **kwargs: _gpu_configs(configs)))
@triton.jit
def _supcon_sample_kernel(z_ptr, labels_ptr, k_ptr, nneg_ptr, state_ptr, N, D, row_start, row_count, n_chunks,
                         stride_m, stride_n, stride_d, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         ONE_K: tl.constexpr):
    """The first bracket [lo, hi] of each row: the quantiles p -/+ Z sigma (p = k / nneg) of the
    sample, interpolated in each sorted chunk of CHUNK columns and averaged over the chunks."""
    m = tl.program_id(1)
    z_m = z_ptr + m.to(tl.int64) * stride_m
    local, rows, rmask, lab_i, k_i, nneg, a = _rows(labels_ptr, k_ptr, nneg_ptr, z_m, row_start, row_count, D,
                                                    stride_n, stride_d, BM, BK, ONE_K)
    s_cnt = tl.zeros((BM,), tl.int32)                     # the sample's negatives (labels only)
    for c in range(n_chunks):
        cols = _sample_cols(c, n_chunks, N, CHUNK)
        lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
        s_cnt += tl.sum(_masks(rows, cols, lab_i, lab_j)[0].to(tl.int32), axis=1)
    p = k_i.to(tl.float32) / tl.maximum(nneg, 1).to(tl.float32)
    sig = tl.sqrt(p * (1.0 - p) / tl.maximum(s_cnt, 1).to(tl.float32))
    f_hi = p - Z * sig
    f_lo = p + Z * sig
    acc_hi = tl.zeros((BM,), tl.float32)
    acc_lo = tl.zeros((BM,), tl.float32)
    used = tl.zeros((BM,), tl.float32)
    for c in range(n_chunks):
        cols = _sample_cols(c, n_chunks, N, CHUNK)
        lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
        s = _sim_tile(a, z_m, rows, cols, N, D, stride_n, stride_d, BM, CHUNK, BK, ONE_K)
        neg = _masks(rows, cols, lab_i, lab_j)[0]
        v = _sort_desc(tl.where(neg, s, float("-inf")))
        sc = tl.sum(neg.to(tl.int32), axis=1)
        acc_hi += _quantile(v, sc, f_hi, CHUNK)
        acc_lo += _quantile(v, sc, f_lo, CHUNK)
        used += (sc > 0).to(tl.float32)
    inv = 1.0 / tl.maximum(used, 1.0)
    lo = tl.where(used > 0, _key(acc_lo * inv), 0x007FFFFF)      # no sample: [-inf, +inf]
    hi = tl.where(used > 0, _key(acc_hi * inv), 0xFF800000)
    state = state_ptr + m.to(tl.int64) * row_count + local
    plane = tl.num_programs(1).to(tl.int64) * row_count
    tl.store(state + LO * plane, lo.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + HI * plane, hi.to(tl.int32, bitcast=True), mask=rmask)


@triton.autotune(configs=CONFIGS, key=["D"], prune_configs_by=_prune(final=False))
@triton.jit
def _supcon_count_kernel(z_ptr, labels_ptr, k_ptr, nneg_ptr, state_ptr, N, D, row_start, row_count,
                        stride_m, stride_n, stride_d, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        ONE_K: tl.constexpr, GROUPED: tl.constexpr, READY_: tl.constexpr):
    """Pass 1 and the counting passes: each row's bracket [lo, hi] narrowed until it holds <= READY
    negatives or a single value (then t_i is known)."""
    m = tl.program_id(1)
    z_m = z_ptr + m.to(tl.int64) * stride_m
    local, rows, rmask, lab_i, k_i, nneg, a = _rows(labels_ptr, k_ptr, nneg_ptr, z_m, row_start, row_count, D,
                                                    stride_n, stride_d, BM, BK, ONE_K)
    has = k_i > 0
    state = state_ptr + m.to(tl.int64) * row_count + local
    plane = tl.num_programs(1).to(tl.int64) * row_count
    lo = tl.load(state + LO * plane, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(state + HI * plane, mask=rmask, other=0).to(tl.uint32, bitcast=True)

    # ---- pass 1: bins of the sample's bracket, from all negatives ([min, max], none above it)
    counts, maxall, minneg, possum, w, c0, klo, khi, mult, small = _count_pass(
        a, z_m, labels_ptr, rows, lab_i, has, lo, hi, N, D, stride_n, stride_d, BM, BN, BK, ONE_K, GROUPED, True, True)
    lo_all, hi_all = _canonical(_key(minneg), _key(maxall))
    lo, hi, c_gt, c_in = _narrow(counts, lo_all, hi_all, tl.zeros((BM,), tl.int32), nneg, k_i,
                                 has & (w != 0.0), w, c0, klo, khi, mult, small, True)
    t = tl.where(k_i == nneg, minneg, _from_key(lo))
    known = has & ((k_i == nneg) | (lo == hi))
    npass = 1

    # ---- counting passes while a bracket holds more than READY negatives (value, then key bins)
    active = has & (known == 0) & (c_in > READY_)
    n_active = tl.sum(active.to(tl.int32), axis=0)
    while n_active > 0:
        if npass < VALUE_PASSES:
            counts, _, _, _, w, c0, klo, khi, mult, small = _count_pass(
                a, z_m, labels_ptr, rows, lab_i, active, lo, hi, N, D, stride_n, stride_d,
                BM, BN, BK, ONE_K, GROUPED, True, False)
            lo, hi, c_gt, c_in = _narrow(counts, lo, hi, c_gt, c_in, k_i, active & (w != 0.0),
                                         w, c0, klo, khi, mult, small, True)
        else:
            counts, _, _, _, w, c0, klo, khi, mult, small = _count_pass(
                a, z_m, labels_ptr, rows, lab_i, active, lo, hi, N, D, stride_n, stride_d,
                BM, BN, BK, ONE_K, GROUPED, False, False)
            lo, hi, c_gt, c_in = _narrow(counts, lo, hi, c_gt, c_in, k_i, active, w, c0, klo, khi,
                                         mult, small, False)
        t = tl.where(active & (lo == hi), _from_key(lo), t)
        known = known | (active & (lo == hi))
        active = has & (known == 0) & (c_in > READY_)
        npass += 1
        # never reached: from any bracket, KEY_PASSES key passes reach a single key
        n_active = tl.sum(active.to(tl.int32), axis=0) * (npass < VALUE_PASSES + KEY_PASSES).to(tl.int32)

    tl.store(state + LO * plane, lo.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + HI * plane, hi.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + C_GT * plane, c_gt, mask=rmask)
    tl.store(state + T * plane, t.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + KNOWN * plane, known.to(tl.int32), mask=rmask)
    tl.store(state + SHIFT * plane, maxall.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + POSSUM * plane, possum.to(tl.int32, bitcast=True), mask=rmask)
    tl.store(state + NPASS * plane, tl.zeros((BM,), tl.int32) + npass, mask=rmask)


@triton.autotune(configs=CONFIGS, key=["D"], prune_configs_by=_prune(final=True))
@triton.jit
def _supcon_final_kernel(z_ptr, labels_ptr, k_ptr, nneg_ptr, delta_ptr, state_ptr, cand_ptr, mult_ptr, theta_ptr,
                        logd_ptr, possum_ptr, passes_ptr, N, D, row_start, row_count, stride_m, stride_n,
                        stride_d, out_stride, passes_stride, inv_tau, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, ONE_K: tl.constexpr, CAP_: tl.constexpr):
    """The final passes: D_i, theta_i. Mode 0: t_i known (hard: s >= t_i - delta); 1: candidates
    are the negatives in [lo - delta, hi]; 2: in [lo, hi] (after more than CAP distinct in 1)."""
    m = tl.program_id(1)
    z_m = z_ptr + m.to(tl.int64) * stride_m
    local, rows, rmask, lab_i, k_i, nneg, a = _rows(labels_ptr, k_ptr, nneg_ptr, z_m, row_start, row_count, D,
                                                    stride_n, stride_d, BM, BK, ONE_K)
    has = k_i > 0
    delta = tl.load(delta_ptr + m)
    state = state_ptr + m.to(tl.int64) * row_count + local
    plane = tl.num_programs(1).to(tl.int64) * row_count
    lo = tl.load(state + LO * plane, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(state + HI * plane, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    c_gt = tl.load(state + C_GT * plane, mask=rmask, other=0)
    t = tl.load(state + T * plane, mask=rmask, other=0).to(tl.float32, bitcast=True)
    known = tl.load(state + KNOWN * plane, mask=rmask, other=0) != 0
    maxall = tl.load(state + SHIFT * plane, mask=rmask, other=0).to(tl.float32, bitcast=True)
    possum = tl.load(state + POSSUM * plane, mask=rmask, other=0).to(tl.float32, bitcast=True)
    npass = tl.max(tl.load(state + NPASS * plane, mask=rmask, other=0), axis=0)
    scratch = (m.to(tl.int64) * row_count + local) * CAP_  # this row's candidate buffer
    cand_row = cand_ptr + scratch
    mult_row = mult_ptr + scratch

    shift = tl.where(maxall > float("-inf"), maxall, 0.0)  # the largest term of D: its exp is 1
    c2 = tl.full((BM,), 1.0, tl.float32) * (inv_tau * LOG2E)
    off = shift * c2
    mode = tl.where(known | (has == 0), 0, 1)
    done = rmask == 0
    theta_o = tl.full((BM,), float("inf"), tl.float32)
    logd_o = tl.zeros((BM,), tl.float32)
    remaining = tl.sum((done == 0).to(tl.int32), axis=0)
    while remaining > 0:
        lo_v = _from_key(lo)
        collect = (mode > 0) & (done == 0)
        above_from = tl.where(mode == 0, tl.where(has, t - delta, float("inf")), _from_key(hi + 1))
        low = tl.where(collect, tl.where(mode == 1, lo_v - delta, lo_v), float("inf"))
        sum_e, min_above, max_below, n_cand = _final_pass(
            a, z_m, labels_ptr, rows, lab_i, above_from, low, c2, off, cand_row, mult_row, N, D, stride_n, stride_d,
            BM, BN, BK, ONE_K, CAP_)
        tl.debug_barrier()                                 # the candidates are read back by other threads
        ok = collect & (n_cand <= CAP_)
        t_sel, sum_c, min_c, max_c = _select(cand_row, mult_row, n_cand, ok, k_i - c_gt, lo, hi, delta, c2, off, BM)
        fin0 = (done == 0) & (mode == 0)
        fin_c = (done == 0) & (((mode == 1) & ok) | ((mode == 2) & (t_sel - delta >= lo_v)))
        d_sum = tl.where(fin0, sum_e, sum_e + sum_c)
        min_h = tl.where(fin0, min_above, min_c)
        max_n = tl.where(fin0, max_below, tl.maximum(max_below, max_c))
        mid = 0.5 * tl.minimum(min_h, 3.0e38) + 0.5 * tl.maximum(max_n, -3.0e38)
        mid = tl.where((mid > max_n) & (mid <= min_h), mid, min_h)
        theta = tl.where(has, tl.where(max_n == float("-inf"), float("-inf"), mid), float("inf"))
        logd = tl.where(d_sum > 0, shift * inv_tau + tl.log(tl.where(d_sum > 0, d_sum, 1.0)), 0.0)
        fin = fin0 | fin_c
        theta_o = tl.where(fin, theta, theta_o)
        logd_o = tl.where(fin, logd, logd_o)
        to_known = (done == 0) & (mode == 2) & (fin_c == 0)
        t = tl.where(to_known, t_sel, t)
        mode = tl.where(to_known, 0, tl.where((done == 0) & (mode == 1) & (ok == 0), 2, mode))
        done = done | fin
        npass += 1
        remaining = tl.sum((done == 0).to(tl.int32), axis=0)
        tl.debug_barrier()                                 # before the next pass overwrites them

    out = m.to(tl.int64) * out_stride + local
    tl.store(theta_ptr + out, theta_o, mask=rmask)
    tl.store(logd_ptr + out, logd_o, mask=rmask)
    tl.store(possum_ptr + out, possum, mask=rmask)
    tl.store(passes_ptr + m * passes_stride + tl.program_id(0), npass)


def supcon_fwd(z: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, nneg: torch.Tensor,
                   delta: torch.Tensor, temperature: float, row_start: int = 0, row_count=None, out=None, *,
                   ready: int = READY.value, cap: int = CAP.value):
    """Forward of anchors [row_start, row_start + row_count) of z [M, N, D] against all N rows.

    z: float32 / float16 / bfloat16, any strides. labels: int32 [N] class ids >= 0, or -1 for an
    ignored row (neither anchor nor candidate). k, nneg: int32 [N], the number of hard negatives
    and of negatives of each anchor (0 for ignored rows). delta: float32 [M], the tie tolerance of
    each modality: a negative is hard iff s >= t_i - delta_m, evaluated in float32. Any z: the
    exponentials are shifted by each row's largest negative or positive similarity.
    Returns (theta, logd, possum, passes): float32 [M, row_count] x 3 (`out` = preallocated
    buffers for them, unit stride along rows) and int32 [M, cdiv(row_count, BM)]: the sweeps
    over all column tiles each program made (see the module docstring). ready / cap: the bracket
    size at which a row's final pass starts and its candidate slots (smaller ones: more counting
    passes and fallbacks; the tests use them to reach those paths at small N).
    """
    m, n, d = z.shape
    row_count = n - row_start if row_count is None else row_count
    if not (0 <= row_start and 0 <= row_count and row_start + row_count <= n):
        raise ValueError(f"row range [{row_start}, {row_start} + {row_count}) outside [0, {n})")
    if not 1 <= ready <= cap:
        raise ValueError(f"ready must be in [1, cap], got ready={ready}, cap={cap}")
    if out is None:
        out = tuple(empty((m, row_count), z, torch.float32) for _ in range(3))
    theta, logd, possum = out
    assert all(t.shape == (m, row_count) and (row_count <= 1 or t.stride(1) == 1) for t in out)
    bm = configs_for(z.dtype, d, _hopper(z))[0].kwargs["BM"]
    sample_bm = launch_configs(SAMPLE_KERNEL_CONFIGS, _gpu_configs)[0].kwargs["BM"]
    passes = torch.zeros(m, triton.cdiv(row_count, bm), device=z.device, dtype=torch.int32)
    if row_count == 0 or m == 0:
        return theta, logd, possum, passes
    labels, k, nneg = (t.to(torch.int32).contiguous() for t in (labels, k, nneg))
    delta = delta.to(device=z.device, dtype=torch.float32).contiguous()
    rows = min(row_count, ROWS_PER_LAUNCH)
    state = empty((STATE_FIELDS, m, rows), z, torch.int32)
    cand = empty((m, rows, cap), z, torch.float32)
    mult = empty((m, rows, cap), z, torch.int32)
    bk = block_k(d, z.dtype)
    one_k, grouped = tile_options(z, d, bk)
    strides = (z.stride(0), z.stride(1), z.stride(2))
    for r0 in range(0, row_count, ROWS_PER_LAUNCH):
        count = min(ROWS_PER_LAUNCH, row_count - r0)
        grid = (triton.cdiv(count, bm), m)
        sample_grid = (triton.cdiv(count, sample_bm), m)
        _supcon_sample_kernel[sample_grid](z, labels, k, nneg, state, n, d, row_start + r0, count, sample_chunks(n),
                                           *strides, BK=bk, ONE_K=one_k)
        _supcon_count_kernel[grid](z, labels, k, nneg, state, n, d, row_start + r0, count, *strides, BK=bk,
                                   ONE_K=one_k, GROUPED=grouped, READY_=ready)
        _supcon_final_kernel[grid](z, labels, k, nneg, delta, state, cand, mult, theta[:, r0:], logd[:, r0:],
                                   possum[:, r0:], passes[:, r0 // bm:], n, d, row_start + r0, count, *strides,
                                   theta.stride(0), passes.stride(0), 1.0 / temperature, BK=bk, ONE_K=one_k, CAP_=cap)
    return theta, logd, possum, passes

