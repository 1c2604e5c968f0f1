"""The three modality streams as one: stacked weights and the ops that run on them.

The MCN layers and projection heads hold one set of weights per stream (the reference's modules,
so `state_dict` keys and `named_parameters` are the reference's). Each step the fast Model lays
every per-stream weight out stacked over a leading stream dimension with ONE concatenation
(`StackedWeights`); its backward is one concatenation too, and each parameter's gradient comes
back as a contiguous view of it. The ops below then do for three streams what the reference does
per stream, one device operation each:

* `stacked_linear`: x [G, N, k] @ w [G, n, k]ᵀ + b [G, n] as one batched GEMM (its own backward,
  so the weight gradient comes out in the weight's [n, k] layout: no transposing copies);
* `stacked_layer_norm`: LayerNorm of each stream with its own affine as one group_norm over the
  token-major state [B, S, G, d] seen as [B·S, G·d] with G groups (same math as LayerNorm: mean and
  biased variance over d, eps inside the square root), forward and backward one op each;
* `dropout`: one mask over the stacked tensor (its own draw per stream and element).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._autocast import matmul_class

__all__ = ["StackedWeights", "stacked_linear", "stacked_layer_norm", "dropout", "streams", "tokens"]


class _StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        # gᵀ·x, not xᵀ·g: the gradient is born in the weight's own layout, so the weight's slice of
        # the StackedWeights backward concatenation (and each parameter's .grad) is a plain view
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


@matmul_class
def stacked_linear(x, weight, bias):
    """G independent nn.Linear's in one launch: x [G, N, k] (any strides), weight [G, n, k],
    bias [G, n] -> [G, N, n] contiguous; slice g equals F.linear(x[g], weight[g], bias[g])."""
    return _StackedLinear.apply(x, weight, bias)


def stacked_layer_norm(x, weight, bias, eps: float):
    """x [B, S, G, d] (token-major, contiguous), weight/bias [G, d]: LayerNorm over d of each of the
    G streams with its own affine -> [B, S, G, d]."""
    b, s, g, d = x.shape
    return F.group_norm(x.reshape(b * s, g * d), g, weight.reshape(-1), bias.reshape(-1), eps).view(b, s, g, d)


def dropout(x, p: float, training: bool):
    """Dropout as one op (CPU: F.dropout would take three); identity when off."""
    if not training or p == 0.0:
        return x
    return torch.native_dropout(x, p, True)[0]


def streams(x):
    """Token-major [B, S, G, d] -> [G, B·S, d] view (the batched-GEMM layout)."""
    b, s, g, d = x.shape
    return x.view(b * s, g, d).transpose(0, 1)


def tokens(y, b: int, s: int):
    """Stream-major [G, B·S, d] -> [B, S, G, d] view (for elementwise ops with the token-major state)."""
    g, _, d = y.shape
    return y.view(g, b, s, d).permute(1, 2, 0, 3)


class StackedWeights:
    """A layout of per-stream parameters as stacked tensors, materialised by one concatenation.

    `add(name, tensors, shape)`: `tensors` (same dtype and device, any shapes) are laid out one after
    the other in the order given and seen as `shape` (their total size). `build()` -> {name: tensor}.
    The gradient of every stacked tensor flows back to its parameters through one concatenation
    (the split's backward) and a view per parameter: no per-parameter copies.
    """

    def __init__(self):
        self._groups: List[Tuple[str, Sequence[torch.Tensor], Tuple[int, ...]]] = []

    def add(self, name: str, tensors: Sequence[torch.Tensor], shape: Tuple[int, ...]):
        self._groups.append((name, list(tensors), tuple(shape)))

    def build(self) -> Dict[str, torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for _, tensors, _ in self._groups for t in tensors])
        sizes = [sum(t.numel() for t in tensors) for _, tensors, _ in self._groups]
        pieces = flat.split(sizes)
        return {name: piece.view(shape) for (name, _, shape), piece in zip(self._groups, pieces)}
