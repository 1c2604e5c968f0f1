"""Shared test helpers: relative error, poisoning, devices, tolerances (DESIGN.md §6)."""
from __future__ import annotations

import math

import pytest
import torch

from mcncl_fast.kernels._common import interpreting

# DESIGN.md §6 tolerances on rel = ||fast - ref|| / ||ref||
TOLERANCE = {torch.float32: 1e-5, "tf32": 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2,
             torch.float64: 1e-10}

INTERPRET = interpreting()     # as the session starts (tests/conftest.py sets it): for skip marks and device lists


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


def supcon_by_loop(z, labels, temperature, hard_ratio, ignore_index=-100, normalize=True):
    """DESIGN.md §4.3 anchor by anchor in float64 with Python lists: no masks, no sorting tricks.

    Every s_ij is one float64 dot product of two rows, so exact duplicates give equal values; the
    tie tolerance is applied as specified (2^-18 x the largest squared norm)."""
    z = z.double()
    if normalize:
        z = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    labels = labels.tolist()
    rows = [i for i in range(len(labels)) if labels[i] != ignore_index]
    delta = 2.0 ** -18 * max((float(z[i] @ z[i]) for i in rows), default=0.0)
    losses = []
    for i in rows:
        positives = [j for j in rows if j != i and labels[j] == labels[i]]
        negatives = [j for j in rows if labels[j] != labels[i]]
        if not positives:
            continue
        sims = {j: float(z[i] @ z[j]) for j in rows}
        hard = []
        if negatives:
            k = min(len(negatives), max(1, math.ceil(hard_ratio * len(negatives) - 1e-6)))
            threshold = sorted((sims[j] for j in negatives), reverse=True)[k - 1]
            hard = [j for j in negatives if sims[j] >= threshold - delta]
        denominator = sum(math.exp(sims[j] / temperature) for j in hard + positives)
        losses.append(-sum(sims[p] / temperature - math.log(denominator) for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0



def spy_host_reads(monkeypatch) -> list:
    """Record every Tensor.item / tolist / __bool__ call (host reads of device data) from now on."""
    reads = []
    for attr in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, attr)

        def spy(self, *a, _original=original, _attr=attr, **k):
            reads.append(_attr)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, spy)
    return reads
