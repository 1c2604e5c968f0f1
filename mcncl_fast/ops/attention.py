"""Public attention op: input checks and dispatch (DESIGN.md §4.2, issue #6 fills the Triton path)."""
from __future__ import annotations

from .._checks import check_attention_args
from ..reference import ops as reference_ops


def attention(q, k, v, key_padding_mask=None, scale=None):
    """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh], key_padding_mask [B, Lk] (True = attend)."""
    check_attention_args(q, k, v, key_padding_mask, scale)
    return reference_ops.attention(q, k, v, key_padding_mask, scale)
