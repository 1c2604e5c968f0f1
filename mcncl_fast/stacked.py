"""The three modality streams as one: stacked parameters and the ops that run on them.

The MCN layers and projection heads of the fast Model store their per-stream weights stacked over a
leading stream dimension (`StackedParameters`: one nn.Parameter per group, saved and loaded under the
reference's per-stream keys), so a step uses them as stored: no per-step concatenation of the weights
and none of their gradients. The ops below do for three streams what the reference does per stream,
one device operation each:

* `stacked_linear`: x [G, N, k] @ w [G, n, k]ᵀ + b [G, n] as one batched GEMM (its own backward,
  so the weight gradient comes out in the weight's [n, k] layout: no transposing copies);
* `stacked_layer_norm`: LayerNorm of each stream with its own affine as one group_norm over the
  token-major state [B, S, G, d] seen as [B·S, G·d] with G groups (same math as LayerNorm: mean and
  biased variance over d, eps inside the square root), forward and backward one op each;
* `dropout`: one mask over the stacked tensor (its own draw per stream and element).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._autocast import matmul_class
from .kernels._common import interpreting

__all__ = ["StackedParameters", "stacked_linear", "stacked_layer_norm", "dropout", "streams", "tokens"]


def _per_group_gemms(x) -> bool:
    """CPU (not the Triton interpreter, not compiling): one mm per stream into a slice of the output. On the
    CPU a batched GEMM over the strided stream views runs slower than the same GEMMs one by one (measured
    with benchmarks/cpu_step_compare.py); on a GPU one launch wins."""
    return x.device.type == "cpu" and not interpreting() and not torch.compiler.is_compiling()


class _StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        if _per_group_gemms(x):
            out = x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))
            for g in range(x.shape[0]):
                torch.addmm(bias[g], x[g], weight[g].t(), out=out[g])
            return out
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        # gᵀ·x, not xᵀ·g: the gradient is born in the weight's own layout (no transposing copy)
        if _per_group_gemms(grad):
            groups = range(x.shape[0])
            if ctx.needs_input_grad[0]:
                grad_x = x.new_empty(x.shape)
                for g in groups:
                    torch.mm(grad[g], weight[g], out=grad_x[g])
            if ctx.needs_input_grad[1]:
                grad_w = weight.new_empty(weight.shape)
                for g in groups:
                    torch.mm(grad[g].t(), x[g], out=grad_w[g])
        else:
            grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
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


class StackedParameters(nn.Module):
    """Per-stream parameters stored stacked: one nn.Parameter per group, saved and loaded under the
    per-stream keys.

    `groups`: (name, [(key, tensor), ...], shape) in order; the group's tensors (keys relative to this
    module's place in the model, e.g. "0.t.attn.0.q_proj.weight" under "layers.") are laid out one after
    the other and seen as `shape`. `tensors()` -> {name: parameter}. `state_dict` gives the per-stream
    keys (views of the stacked parameters, in the order of `groups`' keys as listed at construction, which
    is the per-stream model's order) and `load_state_dict` takes them, so checkpoints move freely between
    this layout and the per-stream one. Optimizer states do not: their entries are per parameter.
    """

    def __init__(self, groups: Sequence[Tuple[str, Sequence[Tuple[str, torch.Tensor]], Tuple[int, ...]]],
                 key_order: Sequence[str]):
        super().__init__()
        self._names: Dict[str, str] = {}                                    # group name -> attribute
        self._pieces: Dict[str, List[Tuple[str, torch.Size]]] = {}         # attribute -> [(key, shape)]
        where: Dict[str, Tuple[str, int]] = {}                             # key -> (attribute, offset)
        for name, pieces, shape in groups:
            attribute = name.replace(".", "_")
            data = torch.cat([t.detach().reshape(-1) for _, t in pieces]).view(shape)
            self.register_parameter(attribute, nn.Parameter(data))
            self._names[name] = attribute
            self._pieces[attribute] = [(key, t.shape) for key, t in pieces]
            offset = 0
            for key, t in pieces:
                where[key] = (attribute, offset)
                offset += t.numel()
        if sorted(key_order) != sorted(where):
            raise ValueError("key_order: expected every per-stream key of the groups once")
        self._key_order = list(key_order)
        self._where = where
        self._shapes = {key: shape for pieces in self._pieces.values() for key, shape in pieces}
        self.register_state_dict_post_hook(_save_per_stream)
        self.register_load_state_dict_pre_hook(_load_per_stream)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, attribute) for name, attribute in self._names.items()}

    def per_stream(self, stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        """{attribute: tensor shaped like that parameter (its value, gradient, ...)} -> {per-stream key:
        view}, in the per-stream order (None stays None)."""
        out = {}
        for key in self._key_order:
            attribute, offset = self._where[key]
            shape, tensor = self._shapes[key], stacked[attribute]
            out[key] = None if tensor is None else tensor.reshape(-1)[offset:offset + shape.numel()].view(shape)
        return out


def _save_per_stream(module: StackedParameters, state_dict, prefix, local_metadata):
    stacked = {attribute: state_dict.pop(prefix + attribute) for attribute in module._pieces}
    state_dict.update({prefix + key: value for key, value in module.per_stream(stacked).items()})


def _load_per_stream(module: StackedParameters, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs):
    for attribute, pieces in module._pieces.items():
        keys = [prefix + key for key, _ in pieces]
        if not all(key in state_dict for key in keys):
            continue               # left as they are: load_state_dict reports the missing stacked parameter
        bad = [f"{key}: expected shape {tuple(shape)}, got {tuple(state_dict[key].shape)}"
               for key, (_, shape) in zip(keys, pieces) if state_dict[key].shape != shape]
        if bad:
            error_msgs.extend(f"size mismatch for {line}" for line in bad)
            for key in keys:
                del state_dict[key]
            continue
        parameter = getattr(module, attribute)
        state_dict[prefix + attribute] = torch.cat([state_dict.pop(key).reshape(-1) for key in keys]).view(
            parameter.shape)
