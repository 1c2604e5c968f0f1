"""Public hard-negative SupCon op: checks, torch.library custom ops, dispatch (DESIGN.md §4.3, §5).

    z' = normalize(z)                          PyTorch (its backward is autograd's)
    loss, theta, logd, npos, ids = _supcon_fwd(z', labels)   custom op mcncl_fast::supcon_fwd
        CUDA / TRITON_INTERPRET=1: Triton kernel (mcncl_fast/kernels/supcon.py, supcon_fwd)
        plain CPU: chunked PyTorch forward, row blocks, O(block·N) memory
    dz' = _supcon_bwd(...)                     custom op mcncl_fast::supcon_bwd
        CUDA: mcncl_fast._C.supcon_backward_cuda   CPU: mcncl_fast._C.supcon_backward_host
MCNCL_FAST_BACKEND=reference routes to mcncl_fast.reference.ops. The label statistics (class ids,
k_i, |P_i|, |Neg_i|) are computed inside the custom op by the reference's `label_statistics`, on the
device and without a host sync when `num_classes` is given, so torch.compile sees no data-dependent
host code. `forward_rows` / `backward_rows` compute a range of anchor rows against all columns
(the data-parallel loss in mcncl_fast.distributed splits the anchors over the ranks with them).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_supcon_args
from ..kernels import supcon as supcon_kernels
from ..reference import ops as reference_ops
from ..reference.ops import IGNORE_INDEX, hard_negative_counts, label_statistics, tie_tolerance
from ._dispatch import input_device, use_reference, use_triton

__all__ = ["supcon_hard_negative_loss", "hard_negative_counts"]

# rows per block of the CPU forward: block·N similarities (and their sort) live at a time
CPU_BLOCK_ELEMENTS = 1 << 20


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code of a z dtype (mcncl_fast._C.SupconDType, defined in csrc/supcon_api.h)."""
    from .. import _C
    return int(getattr(_C.SupconDType, str(dtype).removeprefix("torch.")))


def _row_range(n: int, row_start: int, row_count: Optional[int]):
    row_count = n - row_start if row_count is None else row_count
    if not (0 <= row_start and 0 <= row_count and row_start + row_count <= n):
        raise ValueError(f"row_start, row_count: expected a range inside [0, {n}), got {row_start}, {row_count}")
    return row_start, row_count


# ------------------------------------------------------------------ CPU forward (chunked PyTorch)
def chunked_forward(z: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, temperature: float,
                    delta: Optional[torch.Tensor] = None, row_start: int = 0, row_count: Optional[int] = None,
                    block_elements: int = CPU_BLOCK_ELEMENTS):
    """theta, logd, possum ([M, R] each, z's dtype) of anchor rows [row_start, row_start + R) without an
    N x N matrix: O(block·N) memory. labels: class ids, negative = ignored row; delta [M]: the tie
    tolerance (default: tie_tolerance(z)). Same definitions as the Triton kernel (mcncl_fast/kernels/supcon.py):
    hard = negatives with s >= t_i - delta, theta = midpoint of the smallest hard and the largest
    other negative (-inf when every negative is hard, +inf without any)."""
    m_count, n, _ = z.shape
    row_start, row_count = _row_range(n, row_start, row_count)
    valid = labels >= 0
    if delta is None:
        delta = tie_tolerance(z, valid)
    theta = torch.empty(m_count, row_count, dtype=z.dtype)
    logd = torch.empty_like(theta)
    possum = torch.empty_like(theta)
    block = max(1, min(row_count, block_elements // max(n, 1)))
    inf = float("inf")
    for m in range(m_count):
        zm = z[m]
        for r0 in range(row_start, row_start + row_count, block):
            rows = torch.arange(r0, min(row_start + row_count, r0 + block))
            out = rows - row_start
            ar = torch.arange(len(rows))
            s = zm[rows] @ zm.T                                           # [B, N]
            same = labels[rows, None] == labels[None, :]
            neg = ~same & valid[rows, None] & valid[None, :]
            pos = same & valid[rows, None]
            pos[ar, rows] = False
            neg_s = s.masked_fill(~neg, -inf)                             # negatives only
            kb = k[rows]
            # t_i = k_i-th largest negative; k depends on the class only, so rows share few k values
            t = torch.full((len(rows),), inf, dtype=z.dtype)
            for kv in kb.unique().tolist():
                if kv > 0:
                    sel = (kb == kv).nonzero().squeeze(1)
                    t[sel] = neg_s[sel].kthvalue(n - kv + 1, dim=1).values
            hard = neg_s >= (t - delta[m].to(z.dtype))[:, None]            # ties at t included
            smallest_hard = neg_s.masked_fill(~hard, inf).amin(dim=1)
            below = neg_s.masked_fill_(hard, -inf).amax(dim=1)            # largest other negative
            del neg_s
            mid = 0.5 * smallest_hard + 0.5 * below
            mid = torch.where((mid > below) & (mid <= smallest_hard), mid, smallest_hard)
            theta[m, out] = torch.where(kb > 0, torch.where(below == -inf, -inf, mid), inf)
            possum[m, out] = torch.where(pos, s, 0.0).sum(dim=1)
            lse = torch.logsumexp(s.div_(temperature).masked_fill_(~(hard | pos), -inf), dim=1)
            logd[m, out] = torch.where(torch.isfinite(lse), lse, 0.0)
    return theta, logd, possum


def forward_rows(z: torch.Tensor, stats, temperature: float, row_start: int = 0,
                 row_count: Optional[int] = None):
    """theta, logd, possum (float32 [M, R]) of anchor rows [row_start, row_start + R) of z' [M, N, D]
    against all N rows; `stats` = label_statistics(...) of the N rows."""
    row_start, row_count = _row_range(z.shape[1], row_start, row_count)
    delta = tie_tolerance(z.float(), stats.class_ids >= 0).float().contiguous()
    if use_triton(z):
        return supcon_kernels.supcon_fwd(z, stats.class_ids.to(torch.int32).contiguous(),
                              stats.k.to(torch.int32).contiguous(),
                              stats.negatives.to(torch.int32).contiguous(), delta, temperature,
                              row_start=row_start, row_count=row_count)[:3]
    return chunked_forward(z.float(), stats.class_ids, stats.k, temperature, delta, row_start, row_count)


def combine(logd, possum, npos, temperature):
    """Per-modality loss [M] from the per-row values: mean over anchors with a positive, else 0."""
    has = npos > 0
    per_anchor = logd - possum / (temperature * npos.clamp(min=1).to(logd.dtype))
    per_anchor = torch.where(has[None, :], per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum(dim=1) / has.sum().clamp(min=1).to(logd.dtype)


def _row_weights(grad_loss, npos):
    """w [M, N] = g_m / A on anchors with a positive (else 0), 1/|P_i| [N], |w| per modality [M]."""
    has = npos > 0
    anchors = has.sum().clamp(min=1).to(torch.float32)
    w_m = grad_loss.detach().float().reshape(-1) / anchors
    w = torch.where(has[None, :], w_m[:, None], torch.zeros((), device=npos.device)).contiguous()
    inv_npos = torch.where(has, 1.0 / npos.clamp(min=1).float(), 0.0).float().contiguous()
    return w, inv_npos, w_m.abs().contiguous()


def _backward_call(entry, grad_loss, z, labels, theta, logd, npos, temperature, grad_dtype, last,
                   row_start, row_count):
    """Call _C.supcon_backward_{host,cuda}: dL/dz' of rows [row_start, row_start + R) -> [M, R, D]."""
    m_count, n, d = z.shape
    row_start, row_count = _row_range(n, row_start, row_count)
    w, inv_npos, w_scale = _row_weights(grad_loss, npos)
    grad = torch.empty(m_count, row_count, d, device=z.device, dtype=grad_dtype)
    ids = labels.to(torch.int32).contiguous()
    theta = theta.float().contiguous()
    logd = logd.float().contiguous()
    entry(z.data_ptr(), dtype_code(z.dtype), m_count, n, d, *z.stride(), ids.data_ptr(), theta.data_ptr(),
          logd.data_ptr(), w.data_ptr(), inv_npos.data_ptr(), w_scale.data_ptr(), 1.0 / temperature,
          grad.data_ptr(), last, row_start, row_count)
    return grad


def host_backward(grad_loss, z, labels, theta, logd, npos, temperature, num_threads=0, row_start=0,
                  row_count=None):
    """dL/dz' via mcncl_fast._C.supcon_backward_host (float32 / float64 z), in z's dtype.
    labels: class ids (negative = ignored row); theta, logd [M, N]; npos [N]."""
    from .. import _C
    return _backward_call(_C.supcon_backward_host, grad_loss, z, labels, theta, logd, npos, temperature,
                          z.dtype, num_threads, row_start, row_count)


def _cuda_backward(grad_loss, z, labels, theta, logd, npos, temperature, row_start=0, row_count=None):
    from .. import _C
    stream = torch.cuda.current_stream(z.device).cuda_stream
    return _backward_call(_C.supcon_backward_cuda, grad_loss, z, labels, theta, logd, npos, temperature,
                          torch.float32, stream, row_start, row_count)


def backward_rows(grad_loss, z, labels, theta, logd, npos, temperature, row_start=0, row_count=None):
    """dL/dz' [M, R, D] (z's dtype) of rows [row_start, row_start + R) given every row's theta/logd."""
    if z.numel() == 0:
        return z.new_zeros(z.shape[0], _row_range(z.shape[1], row_start, row_count)[1], z.shape[2])
    if z.is_cuda:
        with input_device(z):
            grad = _cuda_backward(grad_loss, z, labels, theta, logd, npos, temperature, row_start, row_count)
    else:
        zh = z if z.dtype == torch.float64 else z.float()
        grad = host_backward(grad_loss, zh, labels, theta, logd, npos, temperature, 0, row_start, row_count)
    return grad.to(z.dtype)


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("mcncl_fast::supcon_fwd", mutates_args=())
def _supcon_fwd(z: torch.Tensor, labels: torch.Tensor, temperature: float, hard_ratio: float,
                   ignore_index: int, num_classes: Optional[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z' [M, N, D] -> (loss [M], theta [M, N], logd [M, N], npos [N] float32, class ids [N] int32)."""
    with torch.autocast(z.device.type, enabled=False), input_device(z):   # fixed precision by design
        stats = label_statistics(labels, hard_ratio, ignore_index, num_classes)
        ids = stats.class_ids.to(torch.int32)
        npos = stats.positives.float()
        if z.shape[1] == 0:
            empty = z.new_zeros(z.shape[0], 0, dtype=torch.float32)
            return z.new_zeros(z.shape[0], dtype=torch.float32), empty, empty.clone(), npos, ids
        theta, logd, possum = forward_rows(z, stats, temperature)
        return combine(logd.float(), possum.float(), npos, temperature), theta.float(), logd.float(), npos, ids


@_supcon_fwd.register_fake
def _(z, labels, temperature, hard_ratio, ignore_index, num_classes):
    m_count, n, _ = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    return (torch.empty(m_count, **f32), torch.empty(m_count, n, **f32), torch.empty(m_count, n, **f32),
            torch.empty(n, **f32), torch.empty(n, dtype=torch.int32, device=z.device))


@torch.library.custom_op("mcncl_fast::supcon_bwd", mutates_args=())
def _supcon_bwd(grad_loss: torch.Tensor, z: torch.Tensor, class_ids: torch.Tensor, theta: torch.Tensor,
                    logd: torch.Tensor, npos: torch.Tensor, temperature: float) -> torch.Tensor:
    """dL/dz' [M, N, D] in z's dtype."""
    with torch.autocast(z.device.type, enabled=False), input_device(z):
        return backward_rows(grad_loss, z, class_ids, theta, logd, npos, temperature)


@_supcon_bwd.register_fake
def _(grad_loss, z, class_ids, theta, logd, npos, temperature):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, _, temperature, *_ = inputs
    _, theta, logd, npos, ids = output
    ctx.save_for_backward(z, ids, theta, logd, npos)
    ctx.temperature = temperature


def _backward(ctx, grad_loss, *unused):
    z, ids, theta, logd, npos = ctx.saved_tensors
    grad = _supcon_bwd(grad_loss.contiguous(), z, ids, theta, logd, npos, ctx.temperature)
    return grad, None, None, None, None, None


_supcon_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public op
def normalized_embeddings(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    """z [M, N, D] -> the z' the kernels see: float32 (normalised), or 16-bit tiles for the tensor
    cores where the kernels take them (float32 accumulation). The interpreter has no bfloat16
    arithmetic: bfloat16 CPU tensors stay float32 there."""
    zn = z.float()
    if normalize:
        zn = F.normalize(zn, dim=-1, eps=1e-12)
    if use_triton(z) and (z.dtype == torch.float16 or (z.dtype == torch.bfloat16 and z.is_cuda)):
        zn = zn.to(z.dtype)
    return zn


def supcon_hard_negative_loss(z, labels, temperature=0.07, hard_ratio=0.3, normalize=True,
                              ignore_index=IGNORE_INDEX, num_classes=None):
    """z [N, D] -> scalar or [M, N, D] -> [M]; float32 loss (DESIGN.md §4.3).

    Rows labelled `ignore_index` are neither anchors nor candidates. With `num_classes` (labels in
    [0, num_classes) or ignore_index) the op does not synchronise host and device."""
    check_supcon_args(z, labels, temperature, hard_ratio, ignore_index, num_classes)
    if use_reference():
        return reference_ops.supcon_hard_negative_loss(z, labels, temperature, hard_ratio, normalize,
                                                       ignore_index, num_classes)
    single = z.dim() == 2
    zn = normalized_embeddings(z.unsqueeze(0) if single else z, normalize)
    loss = _supcon_fwd(zn, labels.long(), float(temperature), float(hard_ratio), int(ignore_index),
                          num_classes)[0]
    return loss[0] if single else loss
