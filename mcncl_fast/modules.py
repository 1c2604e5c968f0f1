"""The model's building blocks as nn.Modules on the fast ops, usable on their own.

Same parameters and state_dict keys as their reference twins in
`mcncl_fast.reference.model` (they are subclasses); they differ only by the ops namespace they call
(`mcncl_fast.ops` by default).
"""
from __future__ import annotations

from . import ops
from .reference.model import CrossModalLayer as _ReferenceCrossModalLayer
from .reference.model import ProjectionHead
from .reference.model import MultiHeadAttention as _ReferenceMultiHeadAttention
from .reference.model import PSA as _ReferencePSA

__all__ = ["PSA", "MultiHeadAttention", "CrossModalLayer", "ProjectionHead"]


class PSA(_ReferencePSA):
    default_ops = ops


class MultiHeadAttention(_ReferenceMultiHeadAttention):
    default_ops = ops


class CrossModalLayer(_ReferenceCrossModalLayer):
    def __init__(self, cfg, ops=ops):
        super().__init__(cfg, ops)
