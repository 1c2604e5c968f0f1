"""Public attention ops: input checks, dispatch, torch.library custom ops (DESIGN.md §4.2, §5).

`attention` runs one attention [B, H, L, Dh]; `attention_grouped` runs G independent
attentions of the same shapes [G, B, H, L, Dh] in one launch (the fast Model uses it
for the three modality streams of a sub-layer). Both go through one pair of custom
ops on the 5-D layout (`mcncl_fast::attention_fwd` / `attention_bwd`); the single op
is G = 1. Outputs and gradients take the memory layout of q / k / v (so a head-split
view [B, S, H, Dh] -> [B, H, S, Dh] gives an output whose head merge is a free view).

The Triton path takes float32 / float16 / bfloat16 with Dh in {16, 32, 64, 128};
other dtypes or head dims (and plain CPU tensors) take the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._autocast import matmul_class
from .._checks import check_attention_args, check_attention_grouped_args
from ..kernels import attention as kernels
from ..kernels._common import DTYPES
from ..reference import ops as reference_ops
from ._dispatch import input_device, use_triton

__all__ = ["attention", "attention_grouped"]


def _fast_path(q) -> bool:
    return use_triton(q) and q.dtype in DTYPES and q.shape[-1] in kernels.HEAD_DIMS


def _head_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_like(t):
    return torch.empty_like(_head_dim_contiguous(t))


# ----------------------------------------------------------------------------- custom ops
# attention_fwd returns (out, lse, key_end): lse [G·B·H, Lq] float32 and key_end (int32, the mask's leading
# shape [B] / [G, B], per entry 1 + its last valid key; empty without a mask) are saved for attention_bwd,
# so the backward neither recomputes the softmax statistics nor rescans the mask.
@torch.library.custom_op("mcncl_fast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    with input_device(q):
        return kernels.attention_fwd(q, k, v, mask, scale)


def _key_end_shape(key_padding_mask):
    return (0,) if key_padding_mask is None else tuple(key_padding_mask.shape[:-1])


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    g, b, h, lq, _ = q.shape
    return (_out_like(q), q.new_empty((g * b * h, lq), dtype=torch.float32),
            q.new_empty(_key_end_shape(key_padding_mask), dtype=torch.int32))


@torch.library.custom_op("mcncl_fast::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], key_end: torch.Tensor,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, q, k, v, out = (_head_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    with input_device(q):
        return kernels.attention_bwd(grad_out, q, k, v, out, lse, mask, scale, key_end=key_end)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, key_end, scale):
    return _out_like(q), _out_like(k), _out_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse, key_end = output
    ctx.mark_non_differentiable(lse, key_end)
    ctx.set_materialize_grads(False)      # lse's gradient is never used; out's may be None (then no launch)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, key_end)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse, _grad_key_end):
    if grad_out is None:                  # the output is not used by what is differentiated
        return None, None, None, None, None
    q, k, v, out, lse, key_padding_mask, key_end = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, key_end, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public ops
@matmul_class
def attention(q, k, v, key_padding_mask=None, scale=None):
    """softmax(q kᵀ·scale) v. q [B, H, Lq, Dh], k/v [B, H, Lk, Dh], key_padding_mask [B, Lk] bool
    (True = attend). A query whose keys are all masked gives 0 (and zero gradients)."""
    check_attention_args(q, k, v, key_padding_mask, scale)
    if not _fast_path(q):
        return reference_ops.attention(q, k, v, key_padding_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = _attention_fwd(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), key_padding_mask, scale)[0]
    return out.squeeze(0)


@matmul_class
def attention_grouped(q, k, v, key_padding_mask=None, scale=None):
    """G independent attentions in one launch: q [G, B, H, Lq, Dh], k/v [G, B, H, Lk, Dh],
    key_padding_mask [B, Lk] (shared by the groups) or [G, B, Lk]. Same as stacking
    `attention(q[g], k[g], v[g], mask or mask[g], scale)` over g."""
    check_attention_grouped_args(q, k, v, key_padding_mask, scale)
    if not _fast_path(q):
        return reference_ops.attention_grouped(q, k, v, key_padding_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_fwd(q, k, v, key_padding_mask, scale)[0]
