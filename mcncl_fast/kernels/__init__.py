"""Triton kernels, one file per op (installed as mcncl_fast.kernels); shared plumbing in _common.py."""
from . import _common  # noqa: F401  (interpreter work-around; no-op on GPUs)
