"""Autocast policy of the ops, shared by the reference and the fast implementations.

Under `torch.autocast`, PSA and attention behave like torch's matmul-class ops:
their floating inputs (activations and weights) are cast to the autocast dtype,
so bf16 activations next to fp32 parameters work. The SupCon loss is a
reduction: it keeps its inputs' dtype and accumulates in fp32 with autocast
off inside.
"""
from __future__ import annotations

import functools

import torch


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype active for `t`'s device, or None."""
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_to(dtype, value):
    """Cast floating tensors (also inside lists/tuples) to `dtype`; anything else unchanged."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_to(dtype, v) for v in value)
    return value


def matmul_class(fn):
    """Decorator for ops whose first argument is a tensor: under autocast, cast every floating
    tensor argument to the autocast dtype and run the op with autocast off."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        dtype = autocast_dtype(first) if isinstance(first, torch.Tensor) else None
        if dtype is None:
            return fn(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*cast_to(dtype, args), **{k: cast_to(dtype, v) for k, v in kwargs.items()})
    return wrapper


def reduction_class(fn):
    """Decorator for losses: under autocast, run with autocast off on the inputs as given."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or autocast_dtype(first) is None:
            return fn(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper
