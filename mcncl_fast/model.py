"""`mcncl_fast.Model`: the reference model with its hot paths on the fast ops.

Same parameters and state_dict keys as `mcncl_fast.reference.Model` (it is a
subclass); only the op namespace, the PSA module class and one hook differ.
"""
from __future__ import annotations

import torch

from . import ops as fast_ops
from .modules import PSA
from .reference.model import Model as ReferenceModel
from .reference.model import ModelConfig, ModelOutput

__all__ = ["Model", "ModelConfig", "ModelOutput"]


class Model(ReferenceModel):
    ops = fast_ops
    psa_cls = PSA   # its pool() is psa_pool: no [N, L, C] output is materialised

    def _cross_attend(self, attns, queries, keys, key_padding_mask):
        """The three streams' attentions of one sub-layer as one grouped launch.

        Projections are stacked in their [B, S, H, Dh] memory layout (one copy each for q, k, v);
        the grouped output keeps that layout, so each stream's head merge is a view."""
        projected = [attn.project(query, key_value) for attn, query, key_value in zip(attns, queries, keys)]
        q, k, v = (torch.stack([p[i].transpose(1, 2) for p in projected]).transpose(2, 3) for i in range(3))
        out = fast_ops.attention_grouped(q, k, v, key_padding_mask)
        return [attn.merge(out[g]) for g, attn in enumerate(attns)]
