"""Public PSA ops: input checks, dispatch, torch.library custom ops (DESIGN.md §3, §4.1, §5).

`psa` -> [N, L, C] (kernels/psa.py, kernels/psa_backward.py); `psa_pool` -> [N, C], the masked
mean over valid frames of psa's output, computed as gate * (masked mean of the branch output) from
windowed sums of x, without the per-frame convolution or any [N, L, C] intermediate
(kernels/psa_pool.py). Custom ops (namespace mcncl_fast): psa_fwd, psa_pool_fwd (forward, with the
fp32 squeeze z, SE hidden h, gate g and y / the window sums S saved for the backward) and psa_bwd
(all 13 input gradients).
The Triton path takes float32 / float16 / bfloat16; other dtypes (float64), empty inputs and
plain CPU tensors take the reference.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._autocast import matmul_class
from .._checks import check_psa_args
from ..kernels import psa as fwd_kernels
from ..kernels import psa_backward as bwd_kernels
from ..kernels import psa_pool as pool_kernels
from ..reference import ops as reference_ops
from ._dispatch import input_device, use_triton

__all__ = ["psa", "psa_pool"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fast_path(x) -> bool:
    return use_triton(x) and x.dtype in _DTYPES and x.numel() > 0


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mcncl_fast::psa_fwd", mutates_args=())
def _psa_fwd(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
             b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor,
             fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
             frame_mask: Optional[torch.Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> [out, y, z, h, g]: output, branch output (x dtype), squeeze, SE hidden, gate (fp32)."""
    with input_device(x):
        return fwd_kernels.psa_forward(x, (w0, w1, w2, w3), (b0, b1, b2, b3), fc1_weight, fc1_bias, fc2_weight,
                                       fc2_bias, frame_mask)


@_psa_fwd.register_fake
def _(x, w0, w1, w2, w3, b0, b1, b2, b3, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask):
    n, _, c = x.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((n, c), **f32),
            x.new_empty((n, c // 4), **f32), x.new_empty((n, c), **f32))


@torch.library.custom_op("mcncl_fast::psa_pool_fwd", mutates_args=())
def _psa_pool_fwd(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor,
                  fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                  fc2_bias: torch.Tensor, frame_mask: Optional[torch.Tensor]
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> [pool, S, z, h, g]: pooled output, windowed sums S [N, 6 C] (kernels/psa_pool.py), squeeze,
    SE hidden, gate (fp32)."""
    with input_device(x):
        return pool_kernels.psa_pool_forward(x, (w0, w1, w2, w3), (b0, b1, b2, b3), fc1_weight, fc1_bias,
                                             fc2_weight, fc2_bias, frame_mask)


@_psa_pool_fwd.register_fake
def _(x, w0, w1, w2, w3, b0, b1, b2, b3, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask):
    n, _, c = x.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((n, c)), x.new_empty((n, 6 * c), **f32), x.new_empty((n, c), **f32),
            x.new_empty((n, c // 4), **f32), x.new_empty((n, c), **f32))


@torch.library.custom_op("mcncl_fast::psa_bwd", mutates_args=())
def _psa_bwd(grad: torch.Tensor, x: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, h: torch.Tensor,
             g: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
             fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, frame_mask: Optional[torch.Tensor],
             pool: bool) -> List[torch.Tensor]:
    """grad: d out [N, L, C] with aux = y (pool=False) or d pool [N, C] with aux = S (pool=True).
    -> [dx, dw0..dw3, db0..db3, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias]."""
    backward = pool_kernels.psa_pool_backward if pool else bwd_kernels.psa_backward
    with input_device(x):
        return list(backward(grad, x, aux, z, h, g, (w0, w1, w2, w3), fc1_weight, fc2_weight, frame_mask))


@_psa_bwd.register_fake
def _(grad, x, aux, z, h, g, w0, w1, w2, w3, fc1_weight, fc2_weight, frame_mask, pool):
    c = x.shape[-1]
    weights = (w0, w1, w2, w3)
    return ([torch.empty_like(x)] + [torch.empty_like(w) for w in weights]
            + [w.new_empty((c // 4,)) for w in weights]
            + [torch.empty_like(fc1_weight), fc1_weight.new_empty((c // 4,)),
               torch.empty_like(fc2_weight), fc2_weight.new_empty((c,))])


def _params(inputs):
    # inputs: x, w0..w3, b0..b3, fc1_w, fc1_b, fc2_w, fc2_b, frame_mask
    return inputs[0], inputs[1:5], inputs[9], inputs[11], inputs[13]


def _setup_context(ctx, inputs, output):
    x, weights, fc1_w, fc2_w, frame_mask = _params(inputs)
    _, aux, z, h, g = output
    ctx.mark_non_differentiable(aux, z, h, g)
    ctx.set_materialize_grads(False)     # no zero-filled gradients for the saved outputs (4 device ops)
    ctx.save_for_backward(x, aux, z, h, g, *weights, fc1_w, fc2_w, frame_mask)


def _backward(pool: bool):
    def backward(ctx, *grads):
        x, aux, z, h, g, w0, w1, w2, w3, fc1_w, fc2_w, frame_mask = ctx.saved_tensors
        grad = grads[0]
        if grad is None:
            grad = torch.zeros((x.shape[0], x.shape[2]) if pool else x.shape, dtype=x.dtype, device=x.device)
        return (*_psa_bwd(grad, x, aux, z, h, g, w0, w1, w2, w3, fc1_w, fc2_w, frame_mask, pool), None)
    return backward


_psa_fwd.register_autograd(_backward(pool=False), setup_context=_setup_context)
_psa_pool_fwd.register_autograd(_backward(pool=True), setup_context=_setup_context)


# ----------------------------------------------------------------------------- public ops
@matmul_class
def psa(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Pyramid squeeze attention over frames, x [N, L, C] -> [N, L, C] (DESIGN.md §3).

    weights: 4 conv weights [C/4, C/4, k] (k = 3, 5, 7, 9), biases: 4 x [C/4], SE fc1 [C/4, C],
    fc2 [C, C/4]; frame_mask [N, L] bool (True = real frame) or None. Padded frames give 0."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    if not _fast_path(x):
        return reference_ops.psa(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    return _psa_fwd(x, *weights, *biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)[0]


@matmul_class
def psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Masked mean over valid frames of `psa(...)`: [N, L, C] -> [N, C]. Fully padded rows give 0."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    if not _fast_path(x):
        return reference_ops.psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    return _psa_pool_fwd(x, *weights, *biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)[0]
