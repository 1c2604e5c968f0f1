"""Public hard-negative SupCon op: checks, torch.library custom ops, dispatch (DESIGN.md §4.3, §5).

    z' = normalize(z)                          PyTorch (its backward is autograd's)
    loss, theta, logd, npos = supcon_forward(z', labels)   custom op mcncl_fast::supcon_forward
        CUDA / TRITON_INTERPRET=1: Triton kernel (kernels/supcon.py)
        plain CPU: chunked PyTorch forward, row blocks, O(block·N) memory
    dz' = supcon_backward(...)                 custom op mcncl_fast::supcon_backward
        CUDA: mcncl_fast._C.supcon_backward_cuda   CPU: mcncl_fast._C.supcon_backward_host
MCNCL_FAST_BACKEND=reference routes to mcncl_fast.reference.ops. k_i (hard_negative_counts) and
the per-class positive counts are computed inside the custom ops, so torch.compile sees no
data-dependent host code.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .._checks import check_supcon_args
from ..reference import ops as reference_ops
from ..reference.ops import hard_negative_counts
from ._dispatch import use_reference, use_triton

__all__ = ["supcon_hard_negative_loss", "hard_negative_counts"]

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# rows per block of the CPU forward: block·N similarities (and their sort) live at a time
CPU_BLOCK_ELEMENTS = 1 << 20


def class_ids(labels: torch.Tensor) -> torch.Tensor:
    """Dense int32 class ids (labels are any int64 values; a plain int32 cast could merge classes)."""
    return torch.unique(labels, return_inverse=True)[1].reshape(-1).to(torch.int32).contiguous()


def _label_stats(labels: torch.Tensor, hard_ratio: float):
    """k_i (int64 [N]) and |P_i| (int64 [N]) on labels' device."""
    k = hard_negative_counts(labels, hard_ratio)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return k, counts[inverse.reshape(-1)] - 1


# ------------------------------------------------------------------ CPU forward (chunked PyTorch)
def chunked_forward(z: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, temperature: float,
                    block_elements: int = CPU_BLOCK_ELEMENTS):
    """theta, logd, possum ([M, N] each, z's dtype) without an N x N matrix: O(block·N) memory.

    Same definitions as the Triton kernel: theta in (t_i^-, t_i] (see kernels/supcon.py).
    """
    m_count, n, _ = z.shape
    theta = torch.empty(m_count, n, dtype=z.dtype)
    logd = torch.empty_like(theta)
    possum = torch.empty_like(theta)
    block = max(1, min(n, block_elements // max(n, 1)))
    inf = float("inf")
    for m in range(m_count):
        zm = z[m]
        for r0 in range(0, n, block):
            rows = torch.arange(r0, min(n, r0 + block))
            ar = torch.arange(len(rows))
            s = zm[rows] @ zm.T                                           # [B, N]
            pos = labels[rows, None] == labels[None, :]
            neg_s = s.masked_fill(pos, -inf)                              # negatives only
            pos[ar, rows] = False
            kb = k[rows]
            # t_i = k_i-th largest negative; k depends on the class only, so rows share few k values
            t = torch.full((len(rows),), inf, dtype=z.dtype)
            for kv in kb.unique().tolist():
                if kv > 0:
                    sel = (kb == kv).nonzero().squeeze(1)
                    t[sel] = neg_s[sel].kthvalue(n - kv + 1, dim=1).values
            hard = neg_s >= t[:, None]                                    # ties at t included
            below = neg_s.masked_fill_(hard, -inf).amax(dim=1)            # largest negative < t
            del neg_s
            mid = 0.5 * t + 0.5 * below
            mid = torch.where((mid > below) & (mid <= t), mid, t)
            theta[m, rows] = torch.where(kb > 0, torch.where(below == -inf, -inf, mid), inf)
            possum[m, rows] = torch.where(pos, s, 0.0).sum(dim=1)
            lse = torch.logsumexp(s.div_(temperature).masked_fill_(~(hard | pos), -inf), dim=1)
            logd[m, rows] = torch.where(torch.isfinite(lse), lse, 0.0)
    return theta, logd, possum


def combine(logd, possum, npos, temperature):
    """Per-modality loss [M] from the per-row values: mean over anchors with a positive, else 0."""
    has = npos > 0
    per_anchor = logd - possum / (temperature * npos.clamp(min=1).to(logd.dtype))
    per_anchor = torch.where(has[None, :], per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum(dim=1) / has.sum().clamp(min=1).to(logd.dtype)


def host_backward(grad_loss, z, labels, theta, logd, npos, temperature, num_threads=0):
    """dL/dz' via mcncl_fast._C.supcon_backward_host (float32 / float64 z), in z's dtype."""
    from .. import _C
    m_count, n, d = z.shape
    w, inv_npos, w_scale = _row_weights(grad_loss, npos)
    grad = torch.empty(m_count, n, d, dtype=z.dtype)
    labels32 = class_ids(labels)
    theta = theta.float().contiguous()
    logd = logd.float().contiguous()
    _C.supcon_backward_host(z.data_ptr(), DTYPE_CODE[z.dtype], m_count, n, d, *z.stride(), labels32.data_ptr(),
                            theta.data_ptr(), logd.data_ptr(), w.data_ptr(), inv_npos.data_ptr(),
                            w_scale.data_ptr(), 1.0 / temperature, grad.data_ptr(), num_threads)
    return grad


def _row_weights(grad_loss, npos):
    """w [M, N] = g_m / A on anchors with a positive (else 0), 1/|P_i| [N], |w| per modality [M]."""
    has = npos > 0
    anchors = has.sum().clamp(min=1).to(torch.float32)
    w_m = grad_loss.detach().float().reshape(-1) / anchors
    w = torch.where(has[None, :], w_m[:, None], torch.zeros((), device=npos.device)).contiguous()
    inv_npos = torch.where(has, 1.0 / npos.clamp(min=1).float(), 0.0).float().contiguous()
    return w, inv_npos, w_m.abs().contiguous()


def _cuda_backward(grad_loss, z, labels, theta, logd, npos, temperature):
    from .. import _C
    m_count, n, d = z.shape
    w, inv_npos, w_scale = _row_weights(grad_loss, npos)
    grad = torch.empty(m_count, n, d, device=z.device, dtype=torch.float32)
    labels32 = class_ids(labels)
    theta = theta.contiguous()
    logd = logd.contiguous()
    stream = torch.cuda.current_stream(z.device).cuda_stream
    _C.supcon_backward_cuda(z.data_ptr(), DTYPE_CODE[z.dtype], m_count, n, d, *z.stride(), labels32.data_ptr(),
                            theta.data_ptr(), logd.data_ptr(), w.data_ptr(), inv_npos.data_ptr(),
                            w_scale.data_ptr(), 1.0 / temperature, grad.data_ptr(), stream)
    return grad


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("mcncl_fast::supcon_forward", mutates_args=())
def supcon_forward(z: torch.Tensor, labels: torch.Tensor, temperature: float, hard_ratio: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z' [M, N, D] -> (loss [M], theta [M, N], logd [M, N], npos [N]); float32 outputs."""
    with torch.autocast(z.device.type, enabled=False):    # the math is fixed-precision by design
        return _supcon_forward_impl(z, labels, temperature, hard_ratio)


def _supcon_forward_impl(z, labels, temperature, hard_ratio):
    m_count, n, _ = z.shape
    k, npos = _label_stats(labels, hard_ratio)
    if n == 0:
        empty = z.new_zeros(m_count, 0, dtype=torch.float32)
        return z.new_zeros(m_count, dtype=torch.float32), empty, empty.clone(), npos.float()
    if use_triton(z):
        from mcncl_fast.kernels.supcon import supcon_forward as triton_forward
        theta, logd, possum, _ = triton_forward(z, class_ids(labels),
                                                k.to(torch.int32).contiguous(), temperature,
                                                nneg=(n - 1 - npos).to(torch.int32).contiguous())
    else:
        theta, logd, possum = chunked_forward(z.float(), labels, k, temperature)
    npos = npos.float()
    return combine(logd, possum, npos, temperature), theta, logd, npos


@supcon_forward.register_fake
def _(z, labels, temperature, hard_ratio):
    m_count, n, _ = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    return (torch.empty(m_count, **f32), torch.empty(m_count, n, **f32), torch.empty(m_count, n, **f32),
            torch.empty(n, **f32))


@torch.library.custom_op("mcncl_fast::supcon_backward", mutates_args=())
def supcon_backward(grad_loss: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor,
                    logd: torch.Tensor, npos: torch.Tensor, temperature: float) -> torch.Tensor:
    """dL/dz' [M, N, D] in z's dtype."""
    with torch.autocast(z.device.type, enabled=False):
        return _supcon_backward_impl(grad_loss, z, labels, theta, logd, npos, temperature)


def _supcon_backward_impl(grad_loss, z, labels, theta, logd, npos, temperature):
    if z.numel() == 0:
        return torch.zeros_like(z)
    if z.is_cuda:
        grad = _cuda_backward(grad_loss, z, labels, theta, logd, npos, temperature)
    else:
        zh = z if z.dtype == torch.float64 else z.float()
        grad = host_backward(grad_loss, zh, labels, theta, logd, npos, temperature)
    return grad.to(z.dtype)


@supcon_backward.register_fake
def _(grad_loss, z, labels, theta, logd, npos, temperature):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, labels, temperature, _ = inputs
    _, theta, logd, npos = output
    ctx.save_for_backward(z, labels, theta, logd, npos)
    ctx.temperature = temperature


def _backward(ctx, grad_loss, *unused):
    z, labels, theta, logd, npos = ctx.saved_tensors
    grad = supcon_backward(grad_loss.contiguous(), z, labels, theta, logd, npos, ctx.temperature)
    return grad, None, None, None


supcon_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public op
def supcon_hard_negative_loss(z, labels, temperature=0.07, hard_ratio=0.3, normalize=True):
    """z [N, D] -> scalar or [M, N, D] -> [M]; float32 loss (DESIGN.md §4.3)."""
    check_supcon_args(z, labels, temperature, hard_ratio)
    if use_reference():
        return reference_ops.supcon_hard_negative_loss(z, labels, temperature, hard_ratio, normalize)
    single = z.dim() == 2
    z3 = z.unsqueeze(0) if single else z
    zn = z3.float()
    if normalize:
        zn = F.normalize(zn, dim=-1, eps=1e-12)
    if use_triton(z) and (z.dtype == torch.float16 or (z.dtype == torch.bfloat16 and z.is_cuda)):
        # 16-bit tiles for the tensor cores, float32 accumulation (the interpreter has no bfloat16
        # arithmetic: bfloat16 CPU tensors stay float32 there)
        zn = zn.to(z.dtype)
    loss = supcon_forward(zn, labels.long(), float(temperature), float(hard_ratio))[0]
    return loss[0] if single else loss
