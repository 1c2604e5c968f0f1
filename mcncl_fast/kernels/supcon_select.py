"""Selection helpers of the SupCon forward kernel (mcncl_fast/kernels/supcon.py): keys, bins, brackets.

Values are ordered by their uint32 key (order-preserving; -0.0 keyed as +0.0). A bracket is a key
range [lo, hi]; `_canonical` keeps its ends off the one key no value has (0x7FFFFFFF), so that
from_key(lo) <= s <= from_key(hi) holds exactly for the values whose keys lie in [lo, hi].

A counting pass gives every negative a bin b(s), monotone in s: bins 0..BINS - 1 cover the
bracket, b < 0 is below, b = ABOVE above it. The pass counts all of them with the same b, so the
counts are consistent whatever the rounding; the chosen bin's key range is found afterwards by
bisection on keys with the same b. benchmarks/supcon_selection_model.py mirrors these functions in numpy.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

BINS = tl.constexpr(15)             # histogram bins per counting pass: b = 0..14, 15 = above, < 0 below
ABOVE = tl.constexpr(15)            # (the 16 bins' 4-bit counters fill one uint64)
CHUNK = tl.constexpr(32)            # sample columns per sorted chunk
SAMPLE_DIV = tl.constexpr(8)        # the sample takes about N / SAMPLE_DIV columns ...
MAX_CHUNKS = tl.constexpr(256)      # ... in at most MAX_CHUNKS chunks of CHUNK
Z = tl.constexpr(4.0)               # the sample's bracket: quantiles p -/+ Z standard errors
# A row's final pass starts once its bracket holds <= READY negatives; its candidates (distinct values,
# with multiplicities) take up to CAP slots. READY ~ 5x the 200 of a 16-bin cut: one counting pass
# fewer (pass 1 leaves ~670 at N = 262144), bought with larger candidate buffers (launches of fewer rows).
CAP = tl.constexpr(1024)            # candidate slots (distinct values) per row in the final pass
READY = tl.constexpr(960)           # default `ready` of supcon_fwd
VALUE_PASSES = tl.constexpr(2)      # counting passes 1..VALUE_PASSES bin by value, later ones by key
KEY_PASSES = tl.constexpr(9)        # key passes reach a single key within 9 from any bracket
KEY_NEG_INF = tl.constexpr(0x007FFFFF)
KEY_POS_INF = tl.constexpr(0xFF800000)
M16 = tl.constexpr(0x00FF00FF00FF00FF)


def sample_chunks(n: int) -> int:
    """Sample chunks for N = n columns (the launcher's `n_chunks`)."""
    return min(max(n // (CHUNK.value * SAMPLE_DIV.value), 1), MAX_CHUNKS.value)


@triton.jit
def _key(s):
    """Order-preserving uint32 key of float32 s (s + 0.0: -0.0 gets +0.0's key)."""
    bits = (s + 0.0).to(tl.uint32, bitcast=True)
    sign = (bits.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True)
    return bits ^ (sign | 0x80000000)


@triton.jit
def _from_key(key):
    """float32 value of a key (inverse of _key)."""
    bits = tl.where(key >= 0x80000000, key & 0x7FFFFFFF, ~key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _canonical(lo, hi):
    lo = tl.where(lo == 0x7FFFFFFF, 0x80000000, lo).to(tl.uint32)
    hi = tl.where(hi == 0x7FFFFFFF, 0x7FFFFFFE, hi).to(tl.uint32)
    return lo, hi


@triton.jit
def _value_params(lo, hi, active):
    """Value bins of [lo, hi]: b(s) = trunc(min(fma(s, w, c0), ABOVE)), w = (BINS - 0.5) / (hi_v - lo_v),
    c0 = 0.25 - lo_v w: lo_v and hi_v fall a quarter bin inside bins 0 and BINS - 1 (trunc makes
    bin 0 reach down to -1). Rows not active (or whose width gives no finite w): w = 0, c0 = -2."""
    lo_v = _from_key(lo)
    w = (BINS - 0.5) / (_from_key(hi) - lo_v)
    ok = active & (w < float("inf"))
    w = tl.where(ok, w, 0.0)
    return w, tl.where(ok, 0.25 - lo_v * w, -2.0)


@triton.jit
def _vbin(s, w, c0):
    return tl.minimum(tl.fma(s, w, c0), ABOVE).to(tl.int32)


@triton.jit
def _key_params(lo, hi, active):
    """Key bins of [lo, hi]: BINS equal parts of its keys via a 32-bit multiply-high (one key per
    bin when it has <= BINS keys). Rows not active: an empty bracket (hi < lo)."""
    w1 = hi.to(tl.int64) - lo.to(tl.int64) + 1
    small = w1 <= BINS
    mult = tl.where(small, 0, (BINS * 2 ** 32) // w1).to(tl.uint32)
    lo = tl.where(active, lo, 0xFFFFFFFF)
    hi = tl.where(active, hi, 0)
    return lo, hi, mult, small.to(tl.uint32)


@triton.jit
def _kbin(key, lo, hi, mult, small):
    d = key - lo
    inner = (tl.umulhi(d, mult) + d * small).to(tl.int32)
    return tl.where(key < lo, -1, tl.where(key > hi, ABOVE, inner))


@triton.jit
def _bin_of_key(kk, w, c0, lo, hi, mult, small, VALUE: tl.constexpr):
    if VALUE:
        return _vbin(_from_key(kk), w, c0)
    return _kbin(kk, lo, hi, mult, small)


@triton.jit
def _first_key(b, w, c0, lo, hi, mult, small, VALUE: tl.constexpr):
    """Smallest finite key whose bin is >= b (key(+inf) + 1 if none): bisection on keys."""
    a = tl.full(b.shape, KEY_NEG_INF, tl.int64)
    z = tl.full(b.shape, KEY_POS_INF + 1, tl.int64)
    for _ in range(32):
        mid = (a + z) >> 1
        ge = _bin_of_key(mid.to(tl.uint32), w, c0, lo, hi, mult, small, VALUE) >= b
        z = tl.where(ge, mid, z)
        a = tl.where(ge, a, mid + 1)
    return a


@triton.jit
def _groups(x, BM: tl.constexpr, BN: tl.constexpr):
    """[BM, BN] -> [BM, BN / 32, 4, 4, 2] (column 32 g + 8 i + 2 l + j -> [g, i, l, j]). In an MMA
    accumulator a thread holds the columns of one l: summing over i and j stays in registers."""
    return tl.reshape(x, [BM, BN // 32, 4, 4, 2])


@triton.jit
def _hist_part(b, neg, BM: tl.constexpr, BN: tl.constexpr, GROUPED: tl.constexpr):
    """The negatives' bins 0..ABOVE of a tile as byte counters in two uint64 (even bins, odd bins).
    GROUPED: 4-bit counters in one uint64 (1 << 4 b), summed over 8 columns (i, j: at most 8 per
    field, exact) then split into bytes: two [BM, BN / 32, 4]; in an MMA accumulator a thread holds
    those 8 columns, so these sums stay in registers. Else [BM, 1, 1] (1 << 8 (b >> 1) into the
    word of b's parity; at most BN per field)."""
    inside = neg & (b.to(tl.uint32) <= ABOVE)
    if GROUPED:
        inc = inside.to(tl.uint64) << ((b * 4) & 60).to(tl.uint64)
        part = tl.sum(tl.sum(_groups(inc, BM, BN), axis=4), axis=2)
        even = part & 0x0F0F0F0F0F0F0F0F
        odd = (part >> 4) & 0x0F0F0F0F0F0F0F0F
    else:
        inc = inside.to(tl.uint64) << ((b * 4) & 56).to(tl.uint64)
        zero = tl.zeros(inc.shape, tl.uint64)
        even = tl.sum(tl.where((b & 1) == 0, inc, zero), axis=1)[:, None, None]
        odd = tl.sum(tl.where((b & 1) == 0, zero, inc), axis=1)[:, None, None]
    return even, odd


@triton.jit
def _flush(acc_even, acc_odd):
    """Byte counters [BM, G, 4] (<= 255) -> int32 [BM, 16] (bins 0..ABOVE): widened to 16 bits,
    summed over the groups. acc_even's byte k is bin 2k, acc_odd's bin 2k + 1."""
    e0 = tl.sum(tl.sum(acc_even & M16, axis=2), axis=1)          # bins 0, 4, 8, 12
    e1 = tl.sum(tl.sum((acc_even >> 8) & M16, axis=2), axis=1)   # bins 2, 6, 10, 14
    o0 = tl.sum(tl.sum(acc_odd & M16, axis=2), axis=1)           # bins 1, 5, 9, 13
    o1 = tl.sum(tl.sum((acc_odd >> 8) & M16, axis=2), axis=1)    # bins 3, 7, 11, 15
    bins = tl.arange(0, 16)
    field = ((bins // 4) * 16).to(tl.uint64)[None, :]
    even = ((bins % 2) == 0)[None, :]
    low = ((bins % 4) < 2)[None, :]
    word = tl.where(even, tl.where(low, e0[:, None], e1[:, None]), tl.where(low, o0[:, None], o1[:, None]))
    return ((word >> field) & 0xFFFF).to(tl.int32)


@triton.jit
def _narrow(counts, lo, hi, c_gt, c_in, k_i, active, w, c0, klo, khi, mult, small, VALUE: tl.constexpr):
    """After a counting pass over the bracket [lo, hi] (c_gt negatives above it, c_in in it), with
    counts [BM, 16] of bins 0..ABOVE: the bin holding the k-th largest; if it lies below / above
    all bins, the part of [lo, hi] there. Returns the new (lo, hi, c_gt, c_in) where active."""
    bins = tl.arange(0, 16)
    c_ge = tl.sum(counts, axis=1)[:, None] - (tl.cumsum(counts, axis=1) - counts)   # count(bin >= b)
    c_first = tl.sum(counts, axis=1)
    above = tl.sum(tl.where(bins[None, :] == ABOVE, counts, 0), axis=1)
    best = tl.minimum(tl.maximum(tl.sum((c_ge >= k_i[:, None]).to(tl.int32), axis=1) - 1, 0), BINS - 1)
    pick = bins[None, :] == best[:, None]
    h_best = tl.sum(tl.where(pick, counts, 0), axis=1)
    gt_best = tl.sum(tl.where(pick, c_ge, 0), axis=1) - h_best
    miss_above = above >= k_i
    miss_below = c_first < k_i
    b_lo = tl.where(miss_above, ABOVE, tl.where(miss_below, -100, best))
    b_hi = tl.where(miss_above, ABOVE + 1, tl.where(miss_below, 0, best + 1))
    new_lo = _first_key(b_lo, w, c0, klo, khi, mult, small, VALUE)
    new_hi = _first_key(b_hi, w, c0, klo, khi, mult, small, VALUE) - 1
    new_lo = tl.where(miss_below, lo.to(tl.int64), new_lo)
    new_hi = tl.where(miss_above, hi.to(tl.int64), new_hi)
    new_gt = tl.where(miss_above, c_gt, tl.where(miss_below, c_first, gt_best))
    new_in = tl.where(miss_above, above - c_gt, tl.where(miss_below, c_in - (c_first - c_gt), h_best))
    lo2, hi2 = _canonical(new_lo.to(tl.uint32), new_hi.to(tl.uint32))
    return (tl.where(active, lo2, lo), tl.where(active, hi2, hi), tl.where(active, new_gt, c_gt),
            tl.where(active, new_in, c_in))


@triton.jit
def _quantile(v, sc, f, CHUNK_: tl.constexpr):
    """Quantile at fraction f (from the top) of the sorted (descending) sample chunk v [BM, CHUNK]
    holding sc [BM] values: linear between neighbours."""
    x = tl.minimum(tl.maximum(f * sc.to(tl.float32) - 0.5, 0.0), tl.maximum(sc - 1, 0).to(tl.float32))
    j = x.to(tl.int32)
    wt = x - j.to(tl.float32)
    j1 = tl.minimum(j + 1, tl.maximum(sc - 1, 0))
    idx = tl.arange(0, CHUNK_)[None, :]
    v0 = tl.sum(tl.where(idx == j[:, None], v, 0.0), axis=1)
    v1 = tl.sum(tl.where(idx == j1[:, None], v, 0.0), axis=1)
    return tl.where(sc > 0, v0 + wt * (v1 - v0), 0.0)


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _exchange(x, flip, i: tl.constexpr):
    """Bitonic compare-and-swap along hypercube dimension i (0 = innermost). The partner of each
    value is the pair's integer sum minus the value (the interpreter sums natively; the xor
    reductions tl.sort uses run element by element there)."""
    n_dims: tl.constexpr = _log2(x.numel)
    ix = x.to(tl.int32, bitcast=True)
    y = (tl.sum(ix, n_dims - 1 - i, keep_dims=True) - ix).to(tl.float32, bitcast=True)
    return tl.where((x > y) != (flip ^ _indicator(n_dims, i)).to(tl.int1), y, x)


@triton.jit
def _sort_desc(x):
    """x [BM, C] float32 (powers of two) sorted along the rows, largest first: bitonic sort."""
    log_n: tl.constexpr = _log2(x.shape[1])
    n_dims: tl.constexpr = _log2(x.numel)
    h = tl.reshape(x, [2] * n_dims)
    for stage in tl.static_range(1, log_n + 1):
        if stage < log_n:
            flip = _indicator(n_dims, stage)
        else:
            flip = tl.full([1] * n_dims, 1, tl.int32)
        for i in tl.static_range(stage):
            h = _exchange(h, flip, stage - 1 - i)
    return tl.reshape(h, x.shape)
