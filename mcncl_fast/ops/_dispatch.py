"""Which implementation an op call takes (DESIGN.md §5).

CUDA tensors -> Triton kernels / CUDA extension; CPU tensors -> CPU paths,
except under TRITON_INTERPRET=1 where the Triton kernels run on CPU tensors
(how CI tests them). MCNCL_FAST_BACKEND=reference forces the reference.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..kernels._common import interpreting

BACKENDS = ("auto", "reference")


def backend() -> str:
    value = os.environ.get("MCNCL_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MCNCL_FAST_BACKEND: expected one of {BACKENDS}, got {value!r}")
    return value


def use_reference() -> bool:
    return backend() == "reference"


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go through the Triton kernels."""
    if use_reference():
        return False
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def input_device(t: torch.Tensor):
    """Context making t's CUDA device current for the launches inside: Triton and the extension
    launch on the current device, so tensors on cuda:1 while cuda:0 is current would otherwise go to
    the wrong device. A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
