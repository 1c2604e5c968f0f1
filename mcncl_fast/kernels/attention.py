"""Flash-style attention with key padding for short sequences (DESIGN.md §4.2).

Three kernels, each stride-generic over a 5-D layout [G, B, H, L, Dh] (G = independent
groups run in one launch; the single op is G = 1). Any strides work as long as the
head dim is contiguous, so head split/merge views ([B, S, H, Dh] memory seen as
[B, H, S, Dh]) are read and written in place.

* `_attn_fwd_kernel`: online softmax in base 2 (scale·log2(e) folded into one multiply),
  saves the log2-sum-exp per query row.
* `_attn_bwd_dq_kernel`: delta = rowsum(dO·O) (stored for the next kernel) and dq,
  recomputing the probabilities.
* `_attn_bwd_dkdv_kernel`: dk and dv for one key tile, looping over the query tiles.

Masked keys are skipped by tiles: the key loops (forward, dq) stop after the last valid key
of the batch entry, so padding at the end costs nothing and the loop body has no branch
(software pipelining stays on); a dk/dv program whose key tile holds no valid key writes zeros.
The loop bound, per (group, batch) entry 1 + the index of its last valid key (0 if none), is
computed once per forward by `_keys_end_kernel` (one small launch over the mask rows) into an
int32 tensor with the mask's leading shape ([B] or [G, B]); the forward and dq kernels read one
int32 per program, and the backward reuses the forward's tensor. Within that bound each key tile
is still checked against the mask (masks need not be prefixes).

Key padding: mask [B, Lk] (or [G, B, Lk]) bool, True = attend. A batch entry with
no valid key gives a zero output and zero gradients: its LSE is stored as +inf so
every recomputed probability is exactly 0.

fp32 inputs use IEEE dot products; 16-bit inputs accumulate in fp32.

Launchers: `attention_fwd` (the key ends, then the forward), `attention_bwd` (dq, then dk/dv);
`keys_end` (the key-end launch alone).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, empty, empty_like, prune_by

HEAD_DIMS = (16, 32, 64, 128)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# First config = the one the interpreter runs (big tiles: few programs x loop iterations).
# Short dialogues want small tiles (16, 32); long sequences the 128-wide ones.
FWD_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(16, 16, 1, 2), _cfg(32, 32, 2, 2), _cfg(128, 64, 8, 3)]
DQ_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(16, 16, 1, 2), _cfg(32, 32, 2, 2), _cfg(128, 32, 8, 2)]
DKDV_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(16, 16, 1, 2), _cfg(32, 32, 2, 2), _cfg(32, 128, 8, 2)]
# Bytes of shared memory allowed to a config (A100's opt-in maximum, the smaller of the targets).
SMEM_LIMIT = 166912


def _smem_estimate(config, head_dim, elt, kernel):
    """Upper bound of the shared memory a config takes (fitted to, and checked against, the AOT
    compiles in tests/test_attention_aot.py): staged operand tiles + fp32 layout-conversion scratch."""
    bm, bn, st = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kernel == "dkdv":                 # resident k, v tile [BN, D]; staged q, do tiles [BM, D]
        bm, bn = bn, bm
    resident = (1 if kernel == "fwd" else 2) * elt * bm * head_dim
    return 2 * elt * head_dim * bn * max(st - 1, 1) + 4 * bm * max(bn, head_dim) + resident + 1024


def fitting_configs(configs, named_args, kernel, **kwargs):
    """The GPU rule: the configs that fit in shared memory for this head dim / dtype (the interpreter
    takes the first config: mcncl_fast/kernels/_common.py)."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    elt = named_args["Q"].element_size()
    fit = [c for c in configs if _smem_estimate(c, head_dim, elt, kernel) <= SMEM_LIMIT]
    return fit or configs[1:2]


def _prune(kernel):
    return prune_by(lambda configs, named_args, **kw: fitting_configs(configs, named_args, kernel, **kw))


_KEY = ["LQ_KEY", "LK_KEY", "HEAD_DIM", "HAS_MASK"]


@triton.jit
def _program_coords(H, B, L, BLOCK: tl.constexpr):
    """1-D grid (tiles of L fastest) -> g, b, h, flat (g, b, h) index z, all int64; tile start."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(L, BLOCK)
    z = pid // n_tiles
    start = (pid % n_tiles) * BLOCK
    h = z % H
    gb = z // H
    return (gb // B).to(tl.int64), (gb % B).to(tl.int64), h.to(tl.int64), z.to(tl.int64), start


@triton.jit
def _keys_end_kernel(MASK, END, sm_g, sm_b, B, ROWS, LK, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """END[r] = 1 + the index of the last valid key of mask row r = g·B + b (0 if none), for r < ROWS."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    base = (rows // B).to(tl.int64) * sm_g + (rows % B).to(tl.int64) * sm_b
    end = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, LK, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        keep = tl.load(MASK + base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < LK)[None, :], other=0)
        end = tl.maximum(end, tl.max(tl.where(keep != 0, cols[None, :] + 1, 0), axis=1))
    tl.store(END + rows, end, mask=row_ok)


@triton.jit
def _keys_end(END, g, b, se_g, se_b, LK, HAS_MASK: tl.constexpr):
    """The key loops' bound: the entry's precomputed key end (no key after it is valid), else LK."""
    if HAS_MASK:
        return tl.load(END + g * se_g + b * se_b)
    else:
        return LK


@triton.jit
def _key_valid(MASK, mask_off, cols, LK, HAS_MASK: tl.constexpr):
    valid = cols < LK
    if HAS_MASK:
        keep = tl.load(MASK + mask_off + cols, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.autotune(configs=FWD_CONFIGS, key=_KEY, prune_configs_by=_prune("fwd"))
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, MASK, END,
                     sq_g, sq_b, sq_h, sq_l, sk_g, sk_b, sk_h, sk_l,
                     sv_g, sv_b, sv_h, sv_l, so_g, so_b, so_h, so_l, sm_g, sm_b, se_g, se_b,
                     B, H, LQ, LK, qk_scale, LQ_KEY, LK_KEY,
                     HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    g, b, h, z, start_m = _program_coords(H, B, LQ, BLOCK_M)
    q_base = Q + g * sq_g + b * sq_b + h * sq_h
    k_base = K + g * sk_g + b * sk_b + h * sk_h
    v_base = V + g * sv_g + b * sv_b + h * sv_h
    mask_off = g * sm_g + b * sm_b
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_base + rows[:, None] * sq_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, _keys_end(END, g, b, se_g, se_b, LK, HAS_MASK), BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < LK
        valid = _key_valid(MASK, mask_off, cols, LK, HAS_MASK)
        k_t = tl.load(k_base + cols[None, :] * sk_l + offs_d[:, None], mask=in_range[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        # a tile whose keys are all masked leaves m, l, acc unchanged (max with -inf, p = 0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * sv_l + offs_d[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0.0                                       # False only when every key is masked
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_base = O + g * so_g + b * so_b + h * so_h
    tl.store(o_base + rows[:, None] * so_l + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + z * LQ + rows, lse, mask=row_ok)


@triton.autotune(configs=DQ_CONFIGS, key=_KEY, prune_configs_by=_prune("dq"))
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, MASK, END,
                        sq_g, sq_b, sq_h, sq_l, sk_g, sk_b, sk_h, sk_l, sv_g, sv_b, sv_h, sv_l,
                        so_g, so_b, so_h, so_l, sdo_g, sdo_b, sdo_h, sdo_l,
                        sdq_g, sdq_b, sdq_h, sdq_l, sm_g, sm_b, se_g, se_b,
                        B, H, LQ, LK, qk_scale, sm_scale, LQ_KEY, LK_KEY,
                        HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    g, b, h, z, start_m = _program_coords(H, B, LQ, BLOCK_M)
    k_base = K + g * sk_g + b * sk_b + h * sk_h
    v_base = V + g * sv_g + b * sv_b + h * sv_h
    mask_off = g * sm_g + b * sm_b
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rd = rows[:, None]
    q = tl.load(Q + g * sq_g + b * sq_b + h * sq_h + rd * sq_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + g * sdo_g + b * sdo_b + h * sdo_h + rd * sdo_l + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    o = tl.load(O + g * so_g + b * so_b + h * so_h + rd * so_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + z * LQ + rows, delta, mask=row_ok)
    lse = tl.load(LSE + z * LQ + rows, mask=row_ok, other=float("inf"))

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, _keys_end(END, g, b, se_g, se_b, LK, HAS_MASK), BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < LK
        valid = _key_valid(MASK, mask_off, cols, LK, HAS_MASK)
        k_t = tl.load(k_base + cols[None, :] * sk_l + offs_d[:, None], mask=in_range[None, :], other=0.0)
        v_t = tl.load(v_base + cols[None, :] * sv_l + offs_d[:, None], mask=in_range[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + g * sdq_g + b * sdq_b + h * sdq_h + rd * sdq_l + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.autotune(configs=DKDV_CONFIGS, key=_KEY, prune_configs_by=_prune("dkdv"))
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK,
                          sq_g, sq_b, sq_h, sq_l, sk_g, sk_b, sk_h, sk_l, sv_g, sv_b, sv_h, sv_l,
                          sdo_g, sdo_b, sdo_h, sdo_l, sdk_g, sdk_b, sdk_h, sdk_l,
                          sdv_g, sdv_b, sdv_h, sdv_l, sm_g, sm_b,
                          B, H, LQ, LK, qk_scale, sm_scale, LQ_KEY, LK_KEY,
                          HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    g, b, h, z, start_n = _program_coords(H, B, LK, BLOCK_N)
    q_base = Q + g * sq_g + b * sq_b + h * sq_h
    do_base = DO + g * sdo_g + b * sdo_b + h * sdo_h
    cols = start_n + tl.arange(0, BLOCK_N)
    in_range = cols < LK
    valid = _key_valid(MASK, g * sm_g + b * sm_b, cols, LK, HAS_MASK)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    cd = cols[:, None]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:               # a tile of masked keys has zero gradients
        k = tl.load(K + g * sk_g + b * sk_b + h * sk_h + cd * sk_l + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(V + g * sv_g + b * sv_b + h * sv_h + cd * sv_l + offs_d[None, :], mask=in_range[:, None], other=0.0)
        for start_m in range(0, LQ, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < LQ
            q_t = tl.load(q_base + rows[None, :] * sq_l + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * sdo_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + z * LQ + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + z * LQ + rows, mask=row_ok, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale        # [BLOCK_N, BLOCK_M]
            p_t = tl.where(valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + g * sdk_g + b * sdk_b + h * sdk_h + cd * sdk_l + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=in_range[:, None])
    tl.store(DV + g * sdv_g + b * sdv_b + h * sdv_h + cd * sdv_l + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=in_range[:, None])


# ------------------------------------------------------------------------------ launchers
def _strides(t):
    return t.stride()[:4]


def _mask_strides(mask):
    if mask is None:
        return 0, 0
    if mask.dim() == 2:
        return 0, mask.stride(0)
    return mask.stride(0), mask.stride(1)


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _kernel_kwargs(q, k, mask):
    g, b, h, lq, d = q.shape
    lk = k.shape[3]
    return dict(B=b, H=h, LQ=lq, LK=lk, LQ_KEY=triton.next_power_of_2(lq), LK_KEY=triton.next_power_of_2(max(lk, 1)),
                HEAD_DIM=d, HAS_MASK=mask is not None, PRECISION=_precision(q))


def _launch(kernel, grid_len, z, args, common, config):
    """Autotuned launch, or one explicit config (tests use that to run non-first configs)."""
    if config is None:
        kernel[lambda meta: (triton.cdiv(grid_len, meta[_BLOCK[kernel]]) * z,)](*args, **common)
    else:
        fn = kernel.fn
        kw = dict(common, **config.kwargs)
        fn[(triton.cdiv(grid_len, kw[_BLOCK[kernel]]) * z,)](*args, **kw, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)


_BLOCK = {_attn_fwd_kernel: "BLOCK_M", _attn_bwd_dq_kernel: "BLOCK_M", _attn_bwd_dkdv_kernel: "BLOCK_N"}


def _end_strides(mask, key_end):
    if mask is None:
        return 0, 0
    if key_end.dim() == 1:
        return 0, key_end.stride(0)
    return key_end.stride(0), key_end.stride(1)


KEYS_END_ROWS = 16                  # mask rows per program of _keys_end_kernel
KEYS_END_WARPS, KEYS_END_STAGES = 2, 1


def keys_end_block(lk):
    """Key columns per step of _keys_end_kernel: Lk rounded up to a power of two, in [16, 128]."""
    return min(max(triton.next_power_of_2(max(lk, 1)), 16), 128)


def keys_end(mask):
    """int32 tensor with the mask's leading shape ([B] or [G, B]): per entry 1 + the index of its last
    valid key, 0 if it has none. One launch (none for an empty mask); no host sync."""
    end = empty(mask.shape[:-1], mask, torch.int32)
    rows, lk = end.numel(), mask.shape[-1]
    if rows == 0:
        return end
    if lk == 0:
        return end.zero_()
    sm_g, sm_b = _mask_strides(mask)
    _keys_end_kernel[(triton.cdiv(rows, KEYS_END_ROWS),)](
        mask, end, sm_g, sm_b, mask.shape[-2], rows, lk, BLOCK_R=KEYS_END_ROWS, BLOCK_L=keys_end_block(lk),
        num_warps=KEYS_END_WARPS, num_stages=KEYS_END_STAGES)
    return end


def attention_fwd(q, k, v, mask, scale, config=None):
    """q [G, B, H, Lq, Dh], k/v [G, B, H, Lk, Dh] (head dim contiguous), mask None / [B, Lk] / [G, B, Lk] bool.

    Returns (out with q's layout, lse [G*B*H, Lq] float32 in log2 units, key_end): key_end is `keys_end(mask)`
    ([B] or [G, B] int32), to be passed to attention_bwd; an empty int32 tensor without a mask."""
    g, b, h, lq, _ = q.shape
    z = g * b * h
    out = empty_like(q)
    lse = empty((z, lq), q, torch.float32)
    key_end = empty((0,), q, torch.int32) if mask is None else keys_end(mask)
    if q.numel() == 0 or k.shape[3] == 0:          # no query, or no key at all: zero output
        return out.zero_(), lse.fill_(float("inf")), key_end
    common = _kernel_kwargs(q, k, mask)
    mask_arg, end_arg = (q, q) if mask is None else (mask, key_end)
    args = (q, k, v, out, lse, mask_arg, end_arg, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            *_mask_strides(mask), *_end_strides(mask, key_end))
    _launch(_attn_fwd_kernel, lq, z, args, dict(common, qk_scale=scale * LOG2E.value), config)
    return out, lse, key_end


def attention_bwd(grad_out, q, k, v, out, lse, mask, scale, config=None, key_end=None):
    """dq, dk, dv (each with its input's layout) for attention_fwd's output. key_end: the forward's
    (computed here when a direct caller leaves it out)."""
    g, b, h, lq, _ = q.shape
    z = g * b * h
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if mask is not None and key_end is None:
        key_end = keys_end(mask)
    delta = empty_like(lse)
    common = dict(_kernel_kwargs(q, k, mask), qk_scale=scale * LOG2E.value, sm_scale=scale)
    mask_arg = q if mask is None else mask
    ms = _mask_strides(mask)
    end_arg = q if mask is None else key_end
    _launch(_attn_bwd_dq_kernel, lq, z,
            (q, k, v, out, grad_out, dq, lse, delta, mask_arg, end_arg, *_strides(q), *_strides(k), *_strides(v),
             *_strides(out), *_strides(grad_out), *_strides(dq), *ms, *_end_strides(mask, key_end)),
            common, config)
    _launch(_attn_bwd_dkdv_kernel, k.shape[3], z,
            (q, k, v, grad_out, dk, dv, lse, delta, mask_arg, *_strides(q), *_strides(k), *_strides(v),
             *_strides(grad_out), *_strides(dk), *_strides(dv), *ms),
            common, config)
    return dq, dk, dv
