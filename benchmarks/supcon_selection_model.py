"""Passes over the similarity tiles of the SupCon forward's exact selection, modelled in numpy.

`program_passes` takes the decisions mcncl_fast/kernels/supcon.py takes for one program (a block of anchor
rows), on float32 similarities, in the same float32 arithmetic; `before_passes` does the same
for the algorithm the kernel had before (a stats pass, one 16-bin histogram pass per 4 bits of
the key, a denominator pass). A program's count depends only on its own rows, so a few programs
(sampled at random) against all N columns estimate the mean at sizes the interpreter cannot run.
tests/test_supcon_kernel.py checks that the model gives the interpreter's counts exactly on data whose
similarities are exact in float32 (elsewhere numpy's dot products may round differently from the
kernels' tiles, and a decision at a bin edge may differ).

    python benchmarks/supcon_selection_model.py [--sizes 32768 262144] [--programs 8]
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

# the kernels' selection parameters (mcncl_fast/kernels/supcon_select.py; a test checks that they agree)
BINS = 15             # histogram bins per counting pass; 15 = above, < 0 below
ABOVE = 15
CHUNK = 32            # sample columns per sorted chunk
SAMPLE_DIV = 8        # the sample takes about N / SAMPLE_DIV columns ...
MAX_CHUNKS = 256      # ... in at most this many chunks
Z = 4.0               # bracket half-width in standard errors of the sample quantile
CAP = 1024            # candidate slots (distinct values per tile row) per row in the final pass
READY = 960           # a row's final pass can start when its bracket holds <= READY negatives
VALUE_PASSES = 2      # counting passes 1 .. VALUE_PASSES bin by value, later ones by key
KEY_PASSES = 9
KEY_NEG_INF, KEY_POS_INF = 0x007FFFFF, 0xFF800000


# ------------------------------------------------------------------ data
def embeddings(n: int, d: int = 128, classes: int = 7, kind: str = "random", noise: float = 1.0, seed: int = 0):
    """(z float32 [n, d] unit rows, labels int32 [n]). "random": N(0, I) rows, labels uniform;
    "clustered": labels sorted (each class one contiguous run of rows), rows = class mean (a random
    unit vector) + noise * N(0, I / d), so same-class cosines are ~ 1 / (1 + noise^2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    z = rng.standard_normal((n, d), dtype=np.float32)
    if kind == "clustered":
        labels = np.sort(labels)
        means = rng.standard_normal((classes, d), dtype=np.float32)
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        z = means[labels] + np.float32(noise / math.sqrt(d)) * z
    elif kind != "random":
        raise ValueError(f"kind: 'random' or 'clustered', got {kind!r}")
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32), labels


def hard_counts(labels: np.ndarray, hard_ratio: float):
    """(k, nneg) int64 [N]; label -1 = ignored row (k = nneg = 0)."""
    valid = labels >= 0
    sizes = np.bincount(np.where(valid, labels, 0), weights=valid, minlength=1).astype(np.int64)
    nneg = np.where(valid, valid.sum() - sizes[np.where(valid, labels, 0)], 0)
    k = np.minimum(nneg, np.maximum(1, np.ceil(hard_ratio * nneg - 1e-6))).astype(np.int64)
    return np.where(nneg > 0, k, 0), nneg


def keys(s: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 key of float32 s + 0.0 (-0.0 becomes +0.0 first)."""
    bits = (s.astype(np.float32) + np.float32(0)).view(np.uint32)
    return bits ^ ((bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(1 << 31))


def from_key(key: np.ndarray) -> np.ndarray:
    key = np.asarray(key, dtype=np.uint32)
    bits = np.where(key >> 31 != 0, key & np.uint32(0x7FFFFFFF), ~key).astype(np.uint32)
    return bits.view(np.float32)


def sample_chunks(n: int) -> int:
    return min(max(n // (CHUNK * SAMPLE_DIV), 1), MAX_CHUNKS)


def sample_columns(n: int):
    """[chunks, CHUNK] column indices of the sample and their mask (columns < n)."""
    chunks = sample_chunks(n)
    # chunk c takes every chunks-th sample column from c on: each chunk spans all N columns
    g = np.arange(CHUNK, dtype=np.int64)[None, :] * chunks + np.arange(chunks, dtype=np.int64)[:, None]
    cols = g if n <= chunks * CHUNK else g * n // (chunks * CHUNK)
    return cols, cols < n


# ------------------------------------------------------------------ the kernel's decisions
def sample_bracket(s, neg, k, nneg):
    """[lo, hi] (uint32 keys) from the sample: per sorted chunk, the quantiles at p -/+ Z sigma
    interpolated between neighbours, averaged over the chunks. The kernel's float32 arithmetic."""
    f32 = np.float32
    n = s.shape[1]
    cols, cmask = sample_columns(n)
    p = k.astype(f32) / np.maximum(nneg, 1).astype(f32)
    cnt = np.zeros(len(k), np.int32)
    for c in range(cols.shape[0]):
        cnt += (neg[:, np.minimum(cols[c], n - 1)] & cmask[c]).sum(1).astype(np.int32)
    sig = np.sqrt(p * (f32(1) - p) / np.maximum(cnt, 1).astype(f32))
    f_hi, f_lo = p - f32(Z) * sig, p + f32(Z) * sig
    acc_hi = np.zeros(len(k), f32)
    acc_lo = np.zeros(len(k), f32)
    used = np.zeros(len(k), f32)
    for c in range(cols.shape[0]):
        m = neg[:, np.minimum(cols[c], n - 1)] & cmask[c]
        v = np.where(m, s[:, np.minimum(cols[c], n - 1)], -np.inf).astype(f32)
        v = -np.sort(-v, axis=1)                                  # descending, -inf last
        sc = m.sum(1).astype(np.int32)
        for f, acc in ((f_hi, acc_hi), (f_lo, acc_lo)):
            x = np.minimum(np.maximum(f * sc.astype(f32) - f32(0.5), f32(0)), np.maximum(sc - 1, 0).astype(f32))
            j = x.astype(np.int32)
            w = x - j.astype(f32)
            j1 = np.minimum(j + 1, np.maximum(sc - 1, 0))
            v0 = np.take_along_axis(v, j[:, None], 1)[:, 0]
            v1 = np.take_along_axis(v, j1[:, None], 1)[:, 0]
            with np.errstate(invalid="ignore"):                  # rows without sample: -inf - -inf
                acc += np.where(sc > 0, v0 + w * (v1 - v0), f32(0))
        used += (sc > 0).astype(f32)
    have = used > 0
    inv = f32(1) / np.maximum(used, f32(1))
    lo = np.where(have, keys(acc_lo * inv), np.uint32(KEY_NEG_INF)).astype(np.uint32)
    hi = np.where(have, keys(acc_hi * inv), np.uint32(KEY_POS_INF)).astype(np.uint32)
    return lo, hi


def canonical(lo, hi):
    """No float has key 0x7FFFFFFF (-0.0 is keyed as +0.0): move bracket ends off it, so that value
    comparisons with from_key(lo), from_key(hi) select exactly the keys in [lo, hi]."""
    lo = np.where(lo == 0x7FFFFFFF, np.uint32(0x80000000), lo).astype(np.uint32)
    hi = np.where(hi == 0x7FFFFFFF, np.uint32(0x7FFFFFFE), hi).astype(np.uint32)
    return lo, hi


def fma32(x, y, z):
    """float32 fused multiply-add (one rounding), as the interpreter's tl.fma."""
    from triton._C.libtriton import interpreter as _interp
    x, y, z = np.broadcast_arrays(np.asarray(x, np.float32), np.asarray(y, np.float32), np.asarray(z, np.float32))
    return _interp.fma_fp32(np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(z))


def to_int32(x):
    """float32 -> int32 as the interpreter converts (numpy astype; out of range: INT_MIN)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(x, np.float32).astype(np.int32)


def value_params(lo, hi, active):
    f32 = np.float32
    lo_v, hi_v = from_key(lo), from_key(hi)
    with np.errstate(all="ignore"):
        w = (f32(BINS - 0.5) / (hi_v - lo_v).astype(f32)).astype(f32)
    ok = active & (w < np.inf)
    w = np.where(ok, w, f32(0)).astype(f32)
    with np.errstate(all="ignore"):
        c0 = np.where(ok, (f32(0.25) - (lo_v * w).astype(f32)).astype(f32), f32(-2.0)).astype(f32)
    return w, c0


def key_params(lo, hi, active):
    w1 = hi.astype(np.int64) - lo.astype(np.int64) + 1
    small = w1 <= BINS
    with np.errstate(all="ignore"):
        mult = np.where(small, 0, (BINS * 2 ** 32) // np.maximum(w1, 1)).astype(np.uint64)
    return (np.where(active, lo, np.uint32(0xFFFFFFFF)).astype(np.uint32),
            np.where(active, hi, np.uint32(0)).astype(np.uint32),
            mult, small.astype(np.uint64))


def vbin(s, w, c0):
    return to_int32(np.minimum(fma32(s, w, c0), np.float32(ABOVE)))


def kbin(key, lo, hi, mult, small):
    d = (key.astype(np.int64) - lo.astype(np.int64)).astype(np.uint32).astype(np.uint64)
    inner = (((d * mult) >> np.uint64(32)) + d * small).astype(np.int64)
    return np.where(key < lo, -1, np.where(key > hi, ABOVE, inner))


def bins_of(s, key, params, value):
    w, c0, klo, khi, mult, small = params
    if value:
        return vbin(s, w[:, None], c0[:, None]).astype(np.int64)
    return kbin(key, klo[:, None], khi[:, None], mult[:, None], small[:, None])


def first_key(b, params, value):
    """Smallest finite key whose bin is >= b (key(+inf) + 1 if none): bisection on keys."""
    a = np.full(b.shape, KEY_NEG_INF, np.int64)
    z = np.full(b.shape, KEY_POS_INF + 1, np.int64)
    for _ in range(32):
        mid = (a + z) >> 1
        kk = mid.astype(np.uint32)[:, None]
        ge = bins_of(from_key(kk), kk, params, value)[:, 0] >= b
        z = np.where(ge, mid, z)
        a = np.where(ge, a, mid + 1)
    return a


def count_pass(s, key, neg, active, lo, hi, value):
    """Counts [R, 16] of the negatives' bins 0..ABOVE and the bin parameters."""
    w, c0 = value_params(lo, hi, active)
    params = (w, c0) + key_params(lo, hi, active)
    b = bins_of(s, key, params, value)
    inside = neg & (b >= 0) & (b <= ABOVE)
    counts = np.zeros((len(lo), 16), np.int64)
    r, c = np.nonzero(inside)
    np.add.at(counts, (r, b[r, c]), 1)
    return counts, params, w


def narrow(counts, lo, hi, c_gt, c_in, k, active, params, value):
    """The bin holding the k-th largest (or the part of [lo, hi] below / above all bins)."""
    c_ge = counts[:, ::-1].cumsum(1)[:, ::-1]
    c_first, above = c_ge[:, 0], counts[:, ABOVE]
    best = np.clip((c_ge >= k[:, None]).sum(1) - 1, 0, BINS - 1)
    rows = np.arange(len(k))
    h_best = counts[rows, best]
    gt_best = c_ge[rows, best] - h_best
    miss_above, miss_below = above >= k, c_first < k
    b_lo = np.where(miss_above, ABOVE, np.where(miss_below, -100, best))
    b_hi = np.where(miss_above, ABOVE + 1, np.where(miss_below, 0, best + 1))
    new_lo = np.where(miss_below, lo.astype(np.int64), first_key(b_lo, params, value))
    new_hi = np.where(miss_above, hi.astype(np.int64), first_key(b_hi, params, value) - 1)
    new_gt = np.where(miss_above, c_gt, np.where(miss_below, c_first, gt_best))
    new_in = np.where(miss_above, above - c_gt, np.where(miss_below, c_in - (c_first - c_gt), h_best))
    lo2, hi2 = canonical(new_lo.astype(np.uint32), new_hi.astype(np.uint32))
    return (np.where(active, lo2, lo).astype(np.uint32), np.where(active, hi2, hi).astype(np.uint32),
            np.where(active, new_gt, c_gt), np.where(active, new_in, c_in))


def program_passes(s, neg, pos, k, nneg, delta=2.0 ** -18, bn=32, ready=READY, cap=CAP):
    """Passes over the tiles of one program (the kernels' `passes`): s [R, N] float32 similarities,
    neg / pos [R, N] bool, k / nneg [R]; bn = the kernels' column tile (candidates: per tile);
    ready / cap = the kernels' `ready` / `cap` (supcon_fwd's arguments)."""
    f32 = np.float32
    k = k.astype(np.int64)
    nneg = nneg.astype(np.int64)
    key = keys(s)
    has = k > 0
    lo, hi = sample_bracket(s, neg, k, nneg)
    # pass 1: bins of the sample's bracket, from all negatives ([min, max], none above it)
    counts, params, w = count_pass(s, key, neg, has, lo, hi, True)
    maxall = np.where(neg | pos, s, -np.inf).max(1, initial=-np.inf).astype(f32)
    minneg = np.where(neg, s, np.inf).min(1, initial=np.inf).astype(f32)
    lo_all, hi_all = canonical(keys(minneg), keys(maxall))
    lo, hi, c_gt, c_in = narrow(counts, lo_all, hi_all, np.zeros_like(k), nneg, k, has & (w != 0), params, True)
    t = np.where(k == nneg, minneg, from_key(lo))
    known = has & ((k == nneg) | (lo == hi))
    passes = 1
    active = has & ~known & (c_in > ready)
    while active.any():
        value = passes < VALUE_PASSES
        counts, params, w = count_pass(s, key, neg, active, lo, hi, value)
        lo, hi, c_gt, c_in = narrow(counts, lo, hi, c_gt, c_in, k, active & (w != 0) if value else active,
                                    params, value)
        t = np.where(active & (lo == hi), from_key(lo), t)
        known |= active & (lo == hi)
        active = has & ~known & (c_in > ready)
        passes += 1
        if passes >= VALUE_PASSES + KEY_PASSES:
            break
    # final passes: mode 0: t known; 1: candidates in [lo - delta, hi]; 2: in [lo, hi]
    d32 = f32(delta)
    mode = np.where(known | ~has, 0, 1)
    done = np.zeros(len(k), bool)
    rows = np.arange(len(k))
    while not done.all():
        passes += 1
        lo_v = from_key(lo)
        collect = (mode > 0) & ~done
        low = np.where(collect, np.where(mode == 1, (lo_v - d32).astype(f32), lo_v), np.inf).astype(f32)
        above_from = from_key((hi.astype(np.int64) + 1).astype(np.uint32))
        window = neg & collect[:, None] & (s >= low[:, None]) & (s < above_from[:, None])
        n_cand = np.zeros(len(k), np.int64)
        for j0 in range(0, s.shape[1], bn):                # distinct values per tile row
            ws = np.where(window[:, j0:j0 + bn], s[:, j0:j0 + bn], np.nan)
            srt = np.sort(ws, axis=1)
            n_cand += (np.isfinite(srt) & ((srt != np.roll(srt, 1, axis=1)) | (np.arange(srt.shape[1]) == 0))).sum(1)
        ok = collect & (n_cand <= cap)
        cand = -np.sort(-np.where(window, s, -np.inf), axis=1)
        t_sel = cand[rows, np.clip(k - c_gt - 1, 0, cand.shape[1] - 1)].astype(f32)
        fin0 = ~done & (mode == 0)
        fin_c = ~done & (((mode == 1) & ok) | ((mode == 2) & ((t_sel - d32).astype(f32) >= lo_v)))
        to_known = ~done & (mode == 2) & ~fin_c
        t = np.where(to_known, t_sel, t)
        mode = np.where(to_known, 0, np.where(~done & (mode == 1) & ~ok, 2, mode))
        done |= fin0 | fin_c
    return passes


def before_passes(s, neg, k, max_hist=8):
    """The previous kernel: stats pass, 16-bin histogram passes (width 2^shift) until lo == hi or
    count(key >= lo) == k, denominator pass. Returns passes over the tiles (stats + hist + 1)."""
    key = keys(s).astype(np.int64)
    above = neg & (key >= 1 << 31)
    n_above, nneg = above.sum(1), neg.sum(1)
    t_above = n_above >= k
    lo = np.where(t_above, np.where(above, key, 0xFFFFFFFF).min(1, initial=0xFFFFFFFF), 0)
    hi = np.where(t_above, np.where(neg, key, 0).max(1, initial=0), np.where(neg & ~above, key, 0).max(1, initial=0))
    c_lo = np.where(t_above, n_above, nneg)
    done = (k <= 0) | (c_lo == k) | (lo == hi)
    rows = np.arange(len(k))
    npass = 0
    while not done.all() and npass < max_hist:
        width = hi - lo
        shift = sum(((width >> (bit + 4)) != 0).astype(np.int64) for bit in range(28))
        inside = neg & ~done[:, None] & (key >= lo[:, None]) & (key <= hi[:, None])
        r, c = np.nonzero(inside)
        b = (key[r, c] - lo[r]) >> shift[r]
        hist = np.bincount(r * 16 + b, minlength=16 * len(k)).reshape(-1, 16)
        cnt_ge = c_lo[:, None] - (np.cumsum(hist, axis=1) - hist)
        best = (cnt_ge >= k[:, None]).sum(1) - 1
        new_lo = lo + (best << shift)
        new_hi = np.minimum(new_lo + (1 << shift) - 1, hi)
        lo, hi, c_lo = (np.where(done, a, b_) for a, b_ in ((lo, new_lo), (hi, new_hi), (c_lo, cnt_ge[rows, best])))
        done = done | (c_lo == k) | (lo == hi)
        npass += 1
    return npass + 2


def program_rows(n: int, bm: int, programs=None, seed: int = 0):
    """Row blocks [p * bm, (p + 1) * bm) of the chosen programs (all, or `programs` at random)."""
    total = math.ceil(n / bm)
    chosen = np.arange(total)
    if programs is not None and programs < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, programs, replace=False))
    return [np.arange(p * bm, min(n, (p + 1) * bm)) for p in chosen]


def similarities(z, labels, rows):
    """float32 s [R, N], negatives and positives of the anchors `rows` (label -1: ignored)."""
    valid = labels >= 0
    s = (z[rows] @ z.T).astype(np.float32)
    same = labels[rows, None] == labels[None, :]
    neg = valid[rows, None] & valid[None, :] & ~same
    pos = valid[rows, None] & same & (rows[:, None] != np.arange(len(labels))[None, :])
    return s, neg, pos


def simulate(z, labels, hard_ratio=0.3, bm=128, bn=32, programs=None, seed=0, delta=2.0 ** -18, before=False,
             k=None, nneg=None, ready=READY, cap=CAP):
    """Passes over the tiles of the chosen programs -> list of ints."""
    if k is None:
        k, nneg = hard_counts(labels, hard_ratio)
    out = []
    for rows in program_rows(len(labels), bm, programs, seed):
        s, neg, pos = similarities(z, labels, rows)
        out.append(before_passes(s, neg, k[rows]) if before else
                   program_passes(s, neg, pos, k[rows], nneg[rows], delta, bn, ready, cap))
    return out


def interpreter_passes(n: int, kind: str = "random", hard_ratio: float = 0.3, seed: int = 0):
    """Passes per program of mcncl_fast/kernels/supcon.py under TRITON_INTERPRET=1 (a separate process) on
    embeddings(n, kind=kind, seed=seed): list of ints."""
    import json
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = f"""
import json, sys, numpy as np, torch
sys.path.insert(0, {str(root / "benchmarks")!r})
from supcon_selection_model import embeddings, hard_counts
from mcncl_fast.kernels.supcon import supcon_fwd
z, labels = embeddings({n}, kind={kind!r}, seed={seed})
k, nneg = hard_counts(labels, {hard_ratio})
i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.int32)
out = supcon_fwd(torch.from_numpy(z)[None], i32(labels), i32(k), i32(nneg), torch.tensor([2.0 ** -18]), 0.07)
print(json.dumps(out[3][0].tolist()))
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 32768, 262144])
    parser.add_argument("--programs", type=int, default=8)
    parser.add_argument("--bm", type=int, default=128)
    parser.add_argument("--ready", type=int, default=READY, help="the kernels' ready (200 before the finer cut)")
    parser.add_argument("--cap", type=int, default=CAP, help="the kernels' cap (256 before)")
    parser.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    parser.add_argument("--interpreter", type=int, default=0, metavar="N",
                        help="also run the kernels under the interpreter at this N (all programs)")
    args = parser.parse_args(argv)
    for kind in args.kinds if args.interpreter else ():
        z, labels = embeddings(args.interpreter, kind=kind)
        got = interpreter_passes(args.interpreter, kind)
        model = simulate(z, labels, bm=128, bn=128)
        print(f"interpreter, {kind}, N = {args.interpreter}: {got} (model: {'identical' if got == model else model})")
    print("| embeddings | N | programs | before: passes mean (min-max) | after: passes mean (min-max) |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        for n in args.sizes:
            z, labels = embeddings(n, kind=kind)
            new = simulate(z, labels, bm=args.bm, bn=32, programs=args.programs, ready=args.ready, cap=args.cap)
            old = simulate(z, labels, bm=args.bm, programs=args.programs, before=True)
            print(f"| {kind} | {n} | {len(new)} | {np.mean(old):.2f} ({min(old)}-{max(old)}) "
                  f"| {np.mean(new):.2f} ({min(new)}-{max(new)}) |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
