"""Passes of the SupCon forward kernels (mcncl_fast/kernels/supcon.py): the tile loops.

`_sim_tile` is the one place similarities are computed: every pass inlines it, so all passes see
bit-identical values. `_count_pass` is a counting pass (histogram of bins), `_final_pass` the pass
that sums the denominator and collects the candidates near t_i, `_select` the selection among them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .supcon_select import (_flush, _from_key, _hist_part, _kbin, _key, _key_params, _value_params,
                            _vbin)


@triton.jit
def _sim_tile(a, z_m, rows, cols, N, D, stride_n, stride_d, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, ONE_K: tl.constexpr):
    """S[BM, BN] = Z[rows] Z[cols]^T in float32: the one place similarities are computed. `a` =
    the resident anchor tile Z[rows, :BK] when ONE_K (D <= BK). Every pass inlines this code; the
    accumulation order is fixed by the dot's K loop, so all passes see bit-identical values."""
    dk = tl.arange(0, BK)
    if ONE_K:
        b = tl.load(z_m + cols[None, :] * stride_n + dk[:, None] * stride_d,
                    mask=(cols[None, :] < N) & (dk[:, None] < D), other=0.0)
        if z_m.dtype.element_ty == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BK):
        a_k = tl.load(z_m + rows[:, None] * stride_n + (d0 + dk)[None, :] * stride_d,
                      mask=(rows[:, None] < N) & ((d0 + dk)[None, :] < D), other=0.0)
        b = tl.load(z_m + cols[None, :] * stride_n + (d0 + dk)[:, None] * stride_d,
                    mask=(cols[None, :] < N) & ((d0 + dk)[:, None] < D), other=0.0)
        if z_m.dtype.element_ty == tl.float32:
            acc = tl.dot(a_k, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_k, b, acc)
    return acc


@triton.jit
def _masks(rows, cols, lab_i, lab_j):
    """Negatives / positives of anchors `rows` among `cols` (label -1: ignored; padding: -1)."""
    same = lab_i[:, None] == lab_j[None, :]
    neg = (lab_j[None, :] >= 0) & (same == 0)
    pos = same & (lab_j[None, :] >= 0) & (rows[:, None] != cols[None, :])
    return neg, pos


@triton.jit
def _sample_cols(c, n_chunks, N, CHUNK_: tl.constexpr):
    """Columns of sample chunk c: every n_chunks-th of n_chunks * CHUNK points spread over N."""
    g = tl.arange(0, CHUNK_) * n_chunks + c
    total = n_chunks * CHUNK_
    return tl.where(N > total, (g.to(tl.int64) * N // total).to(tl.int32), g)


@triton.jit
def _count_pass(a, z_m, labels_ptr, rows, lab_i, active, lo, hi, N, D, stride_n, stride_d,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr, GROUPED: tl.constexpr,
                VALUE: tl.constexpr, FIRST: tl.constexpr):
    """One counting pass: counts [BM, 16] of the negatives' bins 0..ABOVE (rows `active`); in
    pass 1 (FIRST) also the largest negative or positive, the smallest negative and the sum of
    positives. Returns them and the bin parameters. Byte counters are widened every FLUSH tiles."""
    w, c0 = _value_params(lo, hi, active)
    klo, khi, mult, small = _key_params(lo, hi, active)
    G: tl.constexpr = BN // 32 if GROUPED else 1
    H: tl.constexpr = 4 if GROUPED else 1
    FLUSH: tl.constexpr = 31 if GROUPED else 255 // BN     # tiles until a byte counter could pass 255
    counts = tl.zeros((BM, 16), tl.int32)
    maxall = tl.full((BM,), float("-inf"), tl.float32)
    minneg = tl.full((BM,), float("inf"), tl.float32)
    possum = tl.zeros((BM,), tl.float32)
    for f0 in range(0, N, FLUSH * BN):
        acc_even = tl.zeros((BM, G, H), tl.uint64)
        acc_odd = tl.zeros((BM, G, H), tl.uint64)
        for j0 in range(f0, tl.minimum(N, f0 + FLUSH * BN), BN):
            cols = j0 + tl.arange(0, BN)
            lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
            s = _sim_tile(a, z_m, rows, cols, N, D, stride_n, stride_d, BM, BN, BK, ONE_K)
            neg, pos = _masks(rows, cols, lab_i, lab_j)
            if VALUE:
                b = _vbin(s, w[:, None], c0[:, None])
            else:
                b = _kbin(_key(s), klo[:, None], khi[:, None], mult[:, None], small[:, None])
            p_even, p_odd = _hist_part(b, neg, BM, BN, GROUPED)
            acc_even += p_even
            acc_odd += p_odd
            if FIRST:
                maxall = tl.maximum(maxall, tl.max(tl.where(neg | pos, s, float("-inf")), axis=1))
                minneg = tl.minimum(minneg, tl.min(tl.where(neg, s, float("inf")), axis=1))
                possum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        counts += _flush(acc_even, acc_odd)
    return counts, maxall, minneg, possum, w, c0, klo, khi, mult, small


@triton.jit
def _final_pass(a, z_m, labels_ptr, rows, lab_i, above_from, low, c2, off, cand_row, mult_row, N, D,
                stride_n, stride_d, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr,
                CAP: tl.constexpr):
    """Sum of exp over the positives and the negatives s >= above_from, their smallest, the
    largest negative below both; the distinct negatives in [low, above_from) with their
    multiplicities go to the candidate buffer (per tile, the largest not yet taken, repeatedly)."""
    sum_e = tl.zeros((BM,), tl.float32)
    min_above = tl.full((BM,), float("inf"), tl.float32)
    max_below = tl.full((BM,), float("-inf"), tl.float32)
    below_from = tl.minimum(low, above_from)
    n_cand = tl.zeros((BM,), tl.int32)
    for j0 in range(0, N, BN):
        cols = j0 + tl.arange(0, BN)
        lab_j = tl.load(labels_ptr + cols, mask=cols < N, other=-1)
        s = _sim_tile(a, z_m, rows, cols, N, D, stride_n, stride_d, BM, BN, BK, ONE_K)
        neg, pos = _masks(rows, cols, lab_i, lab_j)
        above = neg & (s >= above_from[:, None])
        e = tl.exp2(s * c2[:, None] - off[:, None])
        sum_e += tl.sum(tl.where(above | pos, e, 0.0), axis=1)
        min_above = tl.minimum(min_above, tl.min(tl.where(above, s, float("inf")), axis=1))
        below = neg & (s < below_from[:, None])
        max_below = tl.maximum(max_below, tl.max(tl.where(below, s, float("-inf")), axis=1))
        window = neg & (above == 0) & (below == 0)
        n_window = tl.max(tl.sum(window.to(tl.int32), axis=1), axis=0)
        prev = tl.full((BM,), float("inf"), tl.float32)
        for _ in range(n_window):
            v = tl.max(tl.where(window & (s < prev[:, None]), s, float("-inf")), axis=1)
            mlt = tl.sum((window & (s == v[:, None])).to(tl.int32), axis=1)
            put = (v > float("-inf")) & (n_cand < CAP)
            tl.store(cand_row + n_cand, v, mask=put)
            tl.store(mult_row + n_cand, mlt, mask=put)
            n_cand += (v > float("-inf")).to(tl.int32)
            prev = v
    return sum_e, min_above, max_below, n_cand


@triton.jit
def _select(cand_row, mult_row, n_cand, ok, r, lo, hi, delta, c2, off, BM: tl.constexpr):
    """Per row where ok: t = the r-th largest of the candidates (with multiplicities; bisection on
    the key bits below lo's and hi's common prefix), then over the candidates >= t - delta: sum of
    exp and the smallest; the largest candidate below."""
    CCH: tl.constexpr = 16
    idx = tl.arange(0, CCH)
    n_ok = tl.where(ok, n_cand, 0)
    nch = tl.cdiv(tl.max(n_ok, axis=0), CCH)
    nb = tl.zeros((BM,), tl.int32)
    for j in tl.static_range(32):
        nb += (((lo ^ hi) >> j) != 0).to(tl.int32)
    x = lo & ~(((tl.full((BM,), 1, tl.int64) << nb.to(tl.int64)) - 1).to(tl.uint32))
    nb_max = tl.max(tl.where(ok, nb, 0), axis=0)
    for i in range(nb_max):
        bit = nb_max - 1 - i
        y = x | (tl.full((BM,), 1, tl.uint32) << bit.to(tl.uint32))
        cnt = tl.zeros((BM,), tl.int32)
        for ch in range(nch):
            slot = ch * CCH + idx
            valid = slot[None, :] < n_ok[:, None]
            c = tl.load(cand_row[:, None] + slot[None, :], mask=valid, other=0.0)
            m = tl.load(mult_row[:, None] + slot[None, :], mask=valid, other=0)
            cnt += tl.sum(tl.where(valid & (_key(c) >= y[:, None]), m, 0), axis=1)
        x = tl.where((bit < nb) & (cnt >= r), y, x)
    t = _from_key(x)
    thr = t - delta
    sum_c = tl.zeros((BM,), tl.float32)
    min_c = tl.full((BM,), float("inf"), tl.float32)
    max_c = tl.full((BM,), float("-inf"), tl.float32)
    for ch in range(nch):
        slot = ch * CCH + idx
        valid = slot[None, :] < n_ok[:, None]
        c = tl.load(cand_row[:, None] + slot[None, :], mask=valid, other=0.0)
        m = tl.load(mult_row[:, None] + slot[None, :], mask=valid, other=0)
        hard = valid & (c >= thr[:, None])
        sum_c += tl.sum(tl.where(hard, m.to(tl.float32) * tl.exp2(c * c2[:, None] - off[:, None]), 0.0), axis=1)
        min_c = tl.minimum(min_c, tl.min(tl.where(hard, c, float("inf")), axis=1))
        max_c = tl.maximum(max_c, tl.max(tl.where(valid & (hard == 0), c, float("-inf")), axis=1))
    return t, sum_c, min_c, max_c
