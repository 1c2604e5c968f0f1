"""Triton kernels, one file per op (installed as mcncl_fast.kernels)."""
from . import _interpreter  # noqa: F401  (interpreter work-arounds; no-op on GPUs)
