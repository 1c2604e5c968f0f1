"""Triton kernels, one file per op (installed as mcncl_fast.kernels)."""
