"""The model's building blocks as nn.Modules on the fast ops, usable on their own.

Same parameters and state_dict keys as their reference twins in
`mcncl_fast.reference.model` (they are subclasses); only the op calls differ.
"""
from __future__ import annotations

from . import ops
from .reference.model import CrossModalLayer, ProjectionHead
from .reference.model import MultiHeadAttention as _ReferenceMultiHeadAttention
from .reference.model import PSA as _ReferencePSA

__all__ = ["PSA", "MultiHeadAttention", "CrossModalLayer", "ProjectionHead"]


class PSA(_ReferencePSA):
    def forward(self, x, frame_mask=None):
        return ops.psa(x, *self.op_args(), frame_mask=frame_mask)

    def pool(self, x, frame_mask=None):
        # pooled PSA without materialising the [N, L, C] output
        return ops.psa_pool(x, *self.op_args(), frame_mask=frame_mask)


class MultiHeadAttention(_ReferenceMultiHeadAttention):
    def forward(self, query, key_value, key_padding_mask=None):
        return self.merge(ops.attention(*self.project(query, key_value), key_padding_mask))
