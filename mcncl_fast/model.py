"""`mcncl_fast.Model`: the reference model with its hot paths on the fast ops, three streams as one.

Same parameters and `state_dict` keys as `mcncl_fast.reference.Model` (it is a subclass, initialised
as the reference): checkpoints move freely between the two. The MCN layers and projection heads store
their per-stream weights stacked over the three streams (`mcncl_fast.stacked.StackedParameters`: one
[3, ...] or [6, ...] parameter per group, saved and loaded under the per-stream keys), so
`named_parameters` and optimizer states differ from the reference's in those modules. A GPU step at
MELD scale is bound by kernel launches and a CPU step by its memory traffic: the three modality streams
run stacked, every projection, FFN, LayerNorm and dropout one batched op for t, a and v on the stored
parameters (no per-step concatenation), and each sub-layer's three cross-attentions one grouped launch.
The state is kept token-major [B, S, 3, d]: the classifier's concat(F_t, F_a, F_v) is then a free view.

Dropout draws one mask over the stacked streams, so with dropout > 0 the random numbers differ from
the reference's per-stream draws (the distribution is the same); compare the two in eval mode or
with dropout = 0. The dropout probability is `config.dropout`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import ops as fast_ops
from .reference import model as reference_model
from .reference.model import MODALITIES, PARTNERS, ModelConfig, ModelOutput
from .stacked import StackedParameters, dropout, stacked_layer_norm, stacked_linear, streams, tokens

__all__ = ["Model", "ModelConfig", "ModelOutput"]

# Key/value sources of the six (sub-layer, stream) cross-attentions, sub-layer-major: stream m's
# queries in sub-layer s attend to partner PARTNERS[m][s]; indices into the stream order t, a, v.
KV_SOURCES = [MODALITIES.index(PARTNERS[m][sub]) for sub in range(2) for m in MODALITIES]


class Model(reference_model.Model):
    ops = fast_ops

    def __init__(self, config=None):
        super().__init__(config)      # the reference's per-stream modules, initialised as the reference's
        # a buffer, not state: index_select on the device without a host-to-device copy per step
        self.register_buffer("kv_source_index", torch.tensor(KV_SOURCES), persistent=False)
        self.norm_eps = self.layers[0]["t"].norms[0].eps
        mcn, heads = self._stacked_groups()
        # the per-stream modules give way to their stacked parameters (same values, same state_dict keys)
        self.layers = StackedParameters(*mcn)
        self.heads = StackedParameters(*heads)

    # -- stacked weights -----------------------------------------------------------------
    def _stacked_groups(self):
        """The MCN's and projection heads' per-stream weights grouped as they are stored stacked:
        -> (MCN groups, MCN keys in order), (head groups, head keys in order), keys relative to "layers." /
        "heads.".

        Per layer l: q{s}/o{s} (query / output projections of sub-layer s) [3, d, d] and [3, d],
        norm{j} [3, d], ffn1 [3, 4d, d], ffn2 [3, d, 4d]. Key/value projections, rows (sub-layer,
        stream): with kv_source "input" one block "kv" [6, T·2d, d] for all layers (columns: layer,
        key|value), with "layer" one "{l}.kv" [6, 2d, d] per layer. Heads: fc1 [3, d, d], fc2 [3, P, d].
        """
        cfg = self.config
        mcn, head = [], []
        mcn_keys = {id(p): k for k, p in self.layers.named_parameters()}
        head_keys = {id(p): k for k, p in self.heads.named_parameters()}

        def add(groups, keys, name, modules, rows):   # weight and bias of each module, stacked in the order given
            weight_shape = modules[0].weight.shape
            groups.append((f"{name}.w", [(keys[id(m.weight)], m.weight) for m in modules],
                           (rows, -1, *weight_shape[1:])))
            groups.append((f"{name}.b", [(keys[id(m.bias)], m.bias) for m in modules], (rows, -1)))

        kv = []
        for l, layer in enumerate(self.layers):
            cells = [layer[m] for m in MODALITIES]
            for sub in range(2):
                add(mcn, mcn_keys, f"{l}.q{sub}", [c.attn[sub].q_proj for c in cells], 3)
                add(mcn, mcn_keys, f"{l}.o{sub}", [c.attn[sub].out_proj for c in cells], 3)
            for j in range(3):
                add(mcn, mcn_keys, f"{l}.norm{j}", [c.norms[j] for c in cells], 3)
            add(mcn, mcn_keys, f"{l}.ffn1", [c.ffn[0] for c in cells], 3)
            add(mcn, mcn_keys, f"{l}.ffn2", [c.ffn[3] for c in cells], 3)
            kv.append([[c.attn[sub].k_proj, c.attn[sub].v_proj] for sub in range(2) for c in cells])
            if cfg.kv_source == "layer":
                add(mcn, mcn_keys, f"{l}.kv", [proj for row in kv[l] for proj in row], 6)
        if cfg.kv_source == "input":
            # keys / values read the unimodal features, the same in every layer: one GEMM serves all
            # layers; row (sub-layer, stream) holds every layer's key and value weights
            add(mcn, mcn_keys, "kv", [proj for row in range(6) for layer_kv in kv for proj in layer_kv[row]], 6)
        add(head, head_keys, "fc1", [self.heads[m].fc1 for m in MODALITIES], 3)
        add(head, head_keys, "fc2", [self.heads[m].fc2 for m in MODALITIES], 3)
        return (mcn, list(mcn_keys.values())), (head, list(head_keys.values()))

    def stacked_parameters(self) -> Dict[str, torch.Tensor]:
        """The MCN's and heads' stacked parameters by group name (see `_stacked_groups`)."""
        return {**self.layers.tensors(), **self.heads.tensors()}

    def per_stream_gradients(self) -> Dict[str, Optional[torch.Tensor]]:
        """Every parameter's gradient under the reference's parameter names (views of the stacked
        gradients), in the reference's order: what `reference.Model.named_parameters()` would give."""
        grads = {}
        for prefix, module in self.named_children():
            if isinstance(module, StackedParameters):
                stacked = {name: p.grad for name, p in module.named_parameters()}
                grads.update({f"{prefix}.{key}": g for key, g in module.per_stream(stacked).items()})
            else:
                grads.update({f"{prefix}.{name}": p.grad for name, p in module.named_parameters()})
        return grads

    # -- forward -------------------------------------------------------------------------
    def _project_kv(self, x, weights, name):
        """Keys and values for the cross-attentions of one layer ("{l}.kv") or of all layers ("kv"),
        from the token-major features x [B, S, 3, d]: one gather of the six partner rows, one GEMM.
        -> per layer, per sub-layer: (k, v) each [3, B, H, S, Dh] (views)."""
        b, s, _, d = x.shape
        h = self.config.num_heads
        sources = x.index_select(2, self.kv_source_index)                     # [B, S, 6, d]
        kv = stacked_linear(streams(sources), weights[f"{name}.w"], weights[f"{name}.b"])   # [6, B·S, T'·2d]
        kv = kv.view(2, 3, b, s, -1, h, d // h)
        # unbind, not indexing: one autograd node per unbind, whose backward is one stack (each indexed
        # view would cost a zero-filled full-size gradient and an add)
        per_sub = [[t.transpose(2, 3) for t in half.unbind(3)] for half in kv.unbind(0)]   # 2 x [T'·2 views]
        layers = len(per_sub[0]) // 2
        return [[(per_sub[sub][2 * l], per_sub[sub][2 * l + 1]) for sub in range(2)] for l in range(layers)]

    def _add_norm(self, x, y, weights, name):
        """LN(x + Dropout(y)) of the three streams: x [B, S, 3, d] token-major, y [3, B·S, d]."""
        b, s = x.shape[:2]
        y = dropout(y, self.config.dropout, self.training)
        # x first: the sum takes x's token-major layout, which group_norm reads as [B·S, 3d] in place
        return stacked_layer_norm(x + tokens(y, b, s), weights[f"{name}.w"], weights[f"{name}.b"],
                                  self.norm_eps)

    def fuse_stacked(self, unimodal, utterance_mask, weights=None):
        """`fuse` with the streams stacked: -> F(T) as one token-major tensor [B, S, 3, d] (t, a, v)."""
        cfg = self.config
        weights = self.stacked_parameters() if weights is None else weights
        x = torch.stack([unimodal[m] for m in MODALITIES], dim=2)           # [B, S, 3, d]
        b, s, _, d = x.shape
        h = cfg.num_heads
        kv_all = self._project_kv(x, weights, "kv") if cfg.kv_source == "input" else None
        for l in range(cfg.num_layers):
            kv = kv_all[l] if kv_all is not None else self._project_kv(x, weights, f"{l}.kv")[0]
            for sub in range(2):
                q = stacked_linear(streams(x), weights[f"{l}.q{sub}.w"], weights[f"{l}.q{sub}.b"])
                q = q.view(3, b, s, h, d // h).transpose(2, 3)                # [3, B, H, S, Dh] view
                k, v = kv[sub]
                heads = fast_ops.attention_grouped(q, k, v, utterance_mask)    # layout of q: merge is a view
                merged = heads.transpose(2, 3).reshape(3, b * s, d)
                out = stacked_linear(merged, weights[f"{l}.o{sub}.w"], weights[f"{l}.o{sub}.b"])
                x = self._add_norm(x, out, weights, f"{l}.norm{sub}")
            hidden = F.relu(stacked_linear(streams(x), weights[f"{l}.ffn1.w"], weights[f"{l}.ffn1.b"]))
            hidden = dropout(hidden, cfg.dropout, self.training)
            out = stacked_linear(hidden, weights[f"{l}.ffn2.w"], weights[f"{l}.ffn2.b"])
            x = self._add_norm(x, out, weights, f"{l}.norm2")
        return x

    def fuse(self, unimodal, utterance_mask):
        """As the reference: {m: F_m(T)} (views of `fuse_stacked`'s output)."""
        return dict(zip(MODALITIES, self.fuse_stacked(unimodal, utterance_mask).unbind(2)))

    def project_stacked(self, fused, weights=None):
        """Projection heads of the three streams: fused [B, S, 3, d] -> z [3, B, S, P]."""
        weights = self.stacked_parameters() if weights is None else weights
        b, s = fused.shape[:2]
        hidden = F.relu(stacked_linear(streams(fused), weights["fc1.w"], weights["fc1.b"]))
        return stacked_linear(hidden, weights["fc2.w"], weights["fc2.b"]).view(3, b, s, -1)

    def forward(self, text, audio, visual, utterance_mask, frame_mask=None, labels=None) -> ModelOutput:
        reference_model.check_model_inputs(self.config, text, audio, visual, utterance_mask, frame_mask, labels)
        weights = self.stacked_parameters()
        unimodal = self.encode(text, audio, visual, utterance_mask, frame_mask)
        fused = self.fuse_stacked(unimodal, utterance_mask, weights)           # [B, S, 3, d]
        logits = self.classifier(fused.flatten(2))      # token-major: concat(F_t, F_a, F_v) is a view
        projections = dict(zip(MODALITIES, self.project_stacked(fused, weights).unbind(0)))
        features = {**{f"fused_{m}": f for m, f in zip(MODALITIES, fused.unbind(2))},
                    **{f"proj_{m}": projections[m] for m in MODALITIES}}
        if labels is None:
            return ModelOutput(logits=logits, features=features)
        losses = reference_model.mcncl_loss(self.config, logits, projections, labels, utterance_mask,
                                            self.ops.supcon_hard_negative_loss)
        return ModelOutput(logits=logits, loss=losses["loss"], ce_loss=losses["ce_loss"],
                           contrastive_loss=losses["contrastive_loss"], features=features)

