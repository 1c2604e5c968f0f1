"""Public PSA ops: input checks, dispatch, torch.library custom ops (DESIGN.md §3, §4.1, §5).

`psa` -> [N, L, C] (mcncl_fast/kernels/psa.py, mcncl_fast/kernels/psa_backward.py); `psa_pool` -> [N, C], the masked
mean over valid frames of psa's output, computed as gate * (masked mean of the branch output) from
windowed sums of x, without the per-frame convolution or any [N, L, C] intermediate
(mcncl_fast/kernels/psa_pool.py). Custom ops (namespace mcncl_fast), the four branch weights and biases as
Tensor[] arguments: psa_fwd, psa_pool_fwd (forward, with the fp32 squeeze z, SE hidden h, gate g and
y / the window sums S saved for the backward) and psa_bwd (all 13 input gradients, the branch ones
as two Tensor[]).
The Triton path takes float32 / float16 / bfloat16; other dtypes (float64), empty inputs and
plain CPU tensors take the reference.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._autocast import matmul_class
from .._checks import check_psa_args
from ..kernels import psa as psa_kernels
from ..kernels import psa_backward as psa_backward_kernels
from ..kernels import psa_pool as pool_kernels
from ..kernels._common import DTYPES
from ..kernels._psa_common import BRANCHES, TAPS
from ..reference import ops as reference_ops
from ._dispatch import input_device, use_triton

__all__ = ["psa", "psa_pool"]


def _fast_path(x) -> bool:
    return use_triton(x) and x.dtype in DTYPES and x.numel() > 0


# ----------------------------------------------------------------------------- custom ops
# Schema of the two forward ops: (x, weights[4], biases[4], fc1_weight, fc1_bias, fc2_weight, fc2_bias,
# frame_mask?) -> (output, aux, z, h, g); aux (y or the window sums S), z, h, g are saved for psa_bwd.
@torch.library.custom_op("mcncl_fast::psa_fwd", mutates_args=())
def _psa_fwd(x: Tensor, weights: List[Tensor], biases: List[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
             fc2_weight: Tensor, fc2_bias: Tensor, frame_mask: Optional[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out, y, z, h, g): output, branch output (x dtype), squeeze, SE hidden, gate (fp32)."""
    with input_device(x):
        return psa_kernels.psa_fwd(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)


@_psa_fwd.register_fake
def _(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask):
    n, _, c = x.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((n, c), **f32),
            x.new_empty((n, c // BRANCHES), **f32), x.new_empty((n, c), **f32))


@torch.library.custom_op("mcncl_fast::psa_pool_fwd", mutates_args=())
def _psa_pool_fwd(x: Tensor, weights: List[Tensor], biases: List[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
                  fc2_weight: Tensor, fc2_bias: Tensor, frame_mask: Optional[Tensor]
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (pool, S, z, h, g): pooled output, windowed sums S [N, 24 C/4] (mcncl_fast/kernels/psa_pool.py), squeeze,
    SE hidden, gate (fp32)."""
    with input_device(x):
        return pool_kernels.psa_pool_fwd(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)


@_psa_pool_fwd.register_fake
def _(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask):
    n, _, c = x.shape
    q = c // BRANCHES
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((n, c)), x.new_empty((n, TAPS.value * q), **f32), x.new_empty((n, c), **f32),
            x.new_empty((n, q), **f32), x.new_empty((n, c), **f32))


@torch.library.custom_op("mcncl_fast::psa_bwd", mutates_args=())
def _psa_bwd(grad: Tensor, x: Tensor, aux: Tensor, z: Tensor, h: Tensor, g: Tensor, weights: List[Tensor],
             fc1_weight: Tensor, fc2_weight: Tensor, frame_mask: Optional[Tensor], pool: bool
             ) -> Tuple[Tensor, List[Tensor], List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """grad: d out [N, L, C] with aux = y (pool=False) or d pool [N, C] with aux = S (pool=True).
    -> (dx, d weights[4], d biases[4], d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias)."""
    backward = pool_kernels.psa_pool_bwd if pool else psa_backward_kernels.psa_bwd
    with input_device(x):
        dx, *d_weights_biases, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b = backward(grad, x, aux, z, h, g, weights,
                                                                             fc1_weight, fc2_weight, frame_mask)
    d_weights, d_biases = d_weights_biases[:BRANCHES], d_weights_biases[BRANCHES:]
    return dx, d_weights, d_biases, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b


@_psa_bwd.register_fake
def _(grad, x, aux, z, h, g, weights, fc1_weight, fc2_weight, frame_mask, pool):
    q = x.shape[-1] // BRANCHES
    return (torch.empty_like(x), [torch.empty_like(w) for w in weights], [w.new_empty((q,)) for w in weights],
            torch.empty_like(fc1_weight), fc1_weight.new_empty((q,)), torch.empty_like(fc2_weight),
            fc2_weight.new_empty((x.shape[-1],)))


def _setup_context(ctx, inputs, output):
    x, weights, _biases, fc1_weight, _fc1_bias, fc2_weight, _fc2_bias, frame_mask = inputs
    _, aux, z, h, g = output
    ctx.mark_non_differentiable(aux, z, h, g)
    ctx.set_materialize_grads(False)     # no zero-filled gradients for the saved outputs (4 device ops)
    ctx.save_for_backward(x, aux, z, h, g, fc1_weight, fc2_weight, frame_mask, *weights)


def _backward(pool: bool):
    def backward(ctx, grad, *_saved_output_grads):
        x, aux, z, h, g, fc1_weight, fc2_weight, frame_mask, *weights = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros((x.shape[0], x.shape[2]) if pool else x.shape, dtype=x.dtype, device=x.device)
        dx, d_weights, d_biases, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b = _psa_bwd(
            grad, x, aux, z, h, g, weights, fc1_weight, fc2_weight, frame_mask, pool)
        return dx, d_weights, d_biases, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, None
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
    return _psa_fwd(x, list(weights), list(biases), fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)[0]


@matmul_class
def psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Masked mean over valid frames of `psa(...)`: [N, L, C] -> [N, C]. Fully padded rows give 0."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    if not _fast_path(x):
        return reference_ops.psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    return _psa_pool_fwd(x, list(weights), list(biases), fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)[0]
