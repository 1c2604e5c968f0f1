"""Shared test helpers: relative error, poisoning, devices, tolerances (DESIGN.md §6)."""
from __future__ import annotations

import os

import pytest
import torch

# DESIGN.md §6 tolerances on rel = ||fast - ref|| / ||ref||
TOLERANCE = {torch.float32: 1e-5, "tf32": 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2,
             torch.float64: 1e-10}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def rel_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """||fast - ref|| / ||ref|| in float64; NaN/Inf anywhere gives inf (never passes)."""
    fast = fast.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if fast.shape != ref.shape:
        raise AssertionError(f"shape mismatch: fast {tuple(fast.shape)} vs ref {tuple(ref.shape)}")
    if not torch.isfinite(fast).all() or not torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm()
    diff = (fast - ref).norm()
    if denom == 0:
        return float(diff)  # reference is exactly zero: absolute error
    return float(diff / denom)


def assert_close_rel(fast, ref, dtype_key, what=""):
    tol = TOLERANCE[dtype_key]
    err = rel_error(fast, ref)
    assert err < tol, f"{what}: rel error {err:.3e} >= {tol:.0e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def kernel_devices():
    """Devices on which the Triton path is testable here: 'cpu' via the interpreter, 'cuda' on a GPU."""
    devices = []
    if INTERPRET:
        devices.append("cpu")
    if torch.cuda.is_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devices
