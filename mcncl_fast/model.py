"""`mcncl_fast.Model`: the reference model with its hot paths on the fast ops.

Same parameters and state_dict keys as `mcncl_fast.reference.Model` (it is a
subclass); only the op namespace and two hooks differ.
"""
from __future__ import annotations

from . import ops as fast_ops
from .reference.model import Model as ReferenceModel
from .reference.model import ModelConfig, ModelOutput

__all__ = ["Model", "ModelConfig", "ModelOutput"]


class Model(ReferenceModel):
    ops = fast_ops

    def _pool_visual(self, frames, frame_mask):
        # pooled PSA without materialising the [N, L, C] output
        return fast_ops.psa_pool(frames, *self.psa.op_args(), frame_mask=frame_mask)
