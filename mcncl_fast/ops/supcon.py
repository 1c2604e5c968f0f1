"""Public hard-negative SupCon op: checks and dispatch (DESIGN.md §4.3, issue #4 fills the fast path)."""
from __future__ import annotations

from .._checks import check_supcon_args
from ..reference import ops as reference_ops
from ..reference.ops import hard_negative_counts  # noqa: F401  (one shared helper, DESIGN.md §4.3)


def supcon_hard_negative_loss(z, labels, temperature=0.07, hard_ratio=0.3, normalize=True):
    """z [N, D] -> scalar or [M, N, D] -> [M]; float32 loss."""
    check_supcon_args(z, labels, temperature, hard_ratio)
    return reference_ops.supcon_hard_negative_loss(z, labels, temperature, hard_ratio, normalize)
