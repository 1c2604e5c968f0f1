"""MCN-CL, the whole model in one file (DESIGN.md §3).

Encoders -> PSA over visual frames -> T layers of bidirectional triple-query
cross-attention -> projection heads + classifier -> CE + weighted SupCon.

Every module calls its ops through `self.ops`, the ops namespace it was built
with (the reference ops by default). `mcncl_fast.Model` is a subclass that
differs by its `ops` (the fast ops, handed to every module it builds) and by
running the MCN and heads with the three streams stacked, on these same
per-stream modules, so parameters and state_dict keys are shared by construction.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops as reference_ops
from .ops import IGNORE_INDEX

MODALITIES = ("t", "a", "v")
PARTNERS = {"t": ("a", "v"), "a": ("t", "v"), "v": ("t", "a")}


@dataclass
class ModelConfig:
    text_dim: int = 768
    audio_dim: int = 88
    visual_dim: int = 1000
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    ffn_mult: int = 4
    proj_dim: int = 128
    num_classes: int = 7
    dropout: float = 0.1
    kv_source: str = "input"
    temperature: float = 0.07
    hard_ratio: float = 0.3
    alpha: float = 0.1
    beta: float = 0.1
    gamma: float = 0.1
    class_weights: Optional[tuple] = None   # per-class CE weights (K floats >= 0), e.g. mcncl_fast.imbalance

    def __post_init__(self):
        for name in ("text_dim", "audio_dim", "visual_dim", "d_model", "num_layers", "num_heads",
                     "ffn_mult", "proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes: expected an integer >= 2, got {self.num_classes!r}")
        if self.d_model % 4:
            raise ValueError(f"ModelConfig.d_model: must be divisible by 4 (PSA branches), got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model: must be divisible by num_heads={self.num_heads}, "
                             f"got {self.d_model}")
        if self.kv_source not in ("input", "layer"):
            raise ValueError(f"ModelConfig.kv_source: expected 'input' or 'layer', got {self.kv_source!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"ModelConfig.temperature: expected a finite value > 0, got {self.temperature!r}")
        if not 0.0 < self.hard_ratio <= 1.0:
            raise ValueError(f"ModelConfig.hard_ratio: expected a value in (0, 1], got {self.hard_ratio!r}")
        for name in ("alpha", "beta", "gamma"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"ModelConfig.{name}: expected a finite value >= 0, got {getattr(self, name)!r}")
        if self.class_weights is not None:
            try:
                weights = tuple(float(w) for w in self.class_weights)
            except (TypeError, ValueError):
                weights = ()
            if len(weights) != self.num_classes or not all(0 <= w < float("inf") for w in weights) or not any(weights):
                raise ValueError(f"ModelConfig.class_weights: expected None or {self.num_classes} finite weights >= 0, "
                                 f"not all 0, got {self.class_weights!r}")
            self.class_weights = weights   # a tuple: hashable, the key of the cached device tensor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


@dataclass
class ModelOutput:
    logits: torch.Tensor                              # [B, S, K]
    loss: Optional[torch.Tensor] = None               # scalar
    ce_loss: Optional[torch.Tensor] = None            # scalar
    contrastive_loss: Optional[torch.Tensor] = None   # [3]: text, audio, visual
    features: Optional[Dict[str, torch.Tensor]] = None  # fused F_m(T) [B, S, d] and projections z_m


class UsesOps(nn.Module):
    """A module that calls an ops namespace (`reference.ops` or `mcncl_fast.ops`): given at construction,
    else the class's `default_ops`. Kept by name (a module object would make the nn.Module impossible to
    copy or pickle)."""
    default_ops = reference_ops

    def __init__(self, ops=None):
        super().__init__()
        self.ops_module = (ops or self.default_ops).__name__

    @property
    def ops(self):
        return sys.modules[self.ops_module]


class PSA(UsesOps):
    """Pyramid squeeze attention: 4 conv branches (k = 3, 5, 7, 9) on C/4 channels + SE gate."""

    def __init__(self, channels: int, ops=None):
        super().__init__(ops)
        quarter = channels // 4
        self.branches = nn.ModuleList(
            nn.Conv1d(quarter, quarter, 2 * (s + 1) + 1, padding=s + 1) for s in range(4))
        self.se = nn.Module()
        self.se.fc1 = nn.Linear(channels, quarter)
        self.se.fc2 = nn.Linear(quarter, channels)

    def op_args(self):
        return ([b.weight for b in self.branches], [b.bias for b in self.branches],
                self.se.fc1.weight, self.se.fc1.bias, self.se.fc2.weight, self.se.fc2.bias)

    def forward(self, x, frame_mask=None):
        """[N, L, C] -> [N, L, C]"""
        return self.ops.psa(x, *self.op_args(), frame_mask=frame_mask)

    def pool(self, x, frame_mask=None):
        """[N, L, C] -> [N, C]: masked mean over valid frames of forward(x) (the fast ops never materialise
        forward(x))."""
        return self.ops.psa_pool(x, *self.op_args(), frame_mask=frame_mask)


class MultiHeadAttention(UsesOps):
    def __init__(self, d_model: int, num_heads: int, ops=None):
        super().__init__(ops)
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x):   # [B, S, d] -> [B, H, S, d/H]
        b, s, d = x.shape
        return x.view(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

    def project(self, query, key_value):
        return (self.split_heads(self.q_proj(query)), self.split_heads(self.k_proj(key_value)),
                self.split_heads(self.v_proj(key_value)))

    def merge(self, heads):     # [B, H, S, d/H] -> [B, S, d] -> out_proj
        b, h, s, dh = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(b, s, h * dh))

    def forward(self, query, key_value, key_padding_mask=None):
        return self.merge(self.ops.attention(*self.project(query, key_value), key_padding_mask))


class CrossModalLayer(nn.Module):
    """One stream of one MCN layer: two cross-attentions (partners p, q) and an FFN, post-norm."""

    def __init__(self, cfg: ModelConfig, ops=None):
        super().__init__()
        d = cfg.d_model
        self.attn = nn.ModuleList(MultiHeadAttention(d, cfg.num_heads, ops) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_mult * d, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, partner_p, partner_q, key_padding_mask=None):
        """x [B, S, d] (this stream), partner_p / partner_q [B, S, d] (the keys and values of the two
        cross-attentions) -> [B, S, d]."""
        for attn, norm, partner in zip(self.attn, self.norms, (partner_p, partner_q)):
            x = norm(x + self.dropout(attn(x, partner, key_padding_mask)))
        return self.norms[2](x + self.dropout(self.ffn(x)))


class ProjectionHead(nn.Module):
    def __init__(self, d_model: int, proj_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_model)
        self.fc2 = nn.Linear(d_model, proj_dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Model(nn.Module):
    ops = reference_ops      # the one thing a variant of the model swaps (mcncl_fast.Model: the fast ops)

    def __init__(self, config: Optional[ModelConfig] = None):
        super().__init__()
        cfg = self.config = config if config is not None else ModelConfig()
        d = cfg.d_model
        self.encoders = nn.ModuleDict({"t": nn.Linear(cfg.text_dim, d), "a": nn.Linear(cfg.audio_dim, d),
                                       "v": nn.Linear(cfg.visual_dim, d)})
        self.psa = PSA(d, self.ops)
        self.layers = nn.ModuleList(nn.ModuleDict({m: CrossModalLayer(cfg, self.ops) for m in MODALITIES})
                                    for _ in range(cfg.num_layers))
        self.heads = nn.ModuleDict({m: ProjectionHead(d, cfg.proj_dim) for m in MODALITIES})
        self.classifier = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(),
                                        nn.Linear(d, d), nn.ReLU(), nn.Linear(d, cfg.num_classes))

    # -- forward ----------------------------------------------------------------------
    def encode(self, text, audio, visual, utterance_mask, frame_mask=None):
        """Unimodal features C_t, C_a, C_v, each [B, S, d]. Padded utterances and frames are zeroed first:
        whatever they hold (NaN included) never reaches a real output (0 * NaN would)."""
        keep = utterance_mask.unsqueeze(-1)
        text, audio = torch.where(keep, text, 0.0), torch.where(keep, audio, 0.0)
        frame_keep = keep if frame_mask is None else frame_mask & keep
        visual = torch.where(frame_keep.unsqueeze(-1), visual, 0.0)
        b, s, length, _ = visual.shape
        frames = self.encoders["v"](visual).reshape(b * s, length, -1)
        fm = None if frame_mask is None else frame_mask.reshape(b * s, length)
        c_v = self.psa.pool(frames, fm).reshape(b, s, -1)   # masked mean over frames of PSA
        return {"t": self.encoders["t"](text), "a": self.encoders["a"](audio), "v": c_v}

    def fuse(self, unimodal, utterance_mask):
        """T layers of triple-query cross-attention; the three streams update in parallel."""
        state = dict(unimodal)
        for layer in self.layers:
            kv = unimodal if self.config.kv_source == "input" else state
            state = {m: layer[m](state[m], kv[PARTNERS[m][0]], kv[PARTNERS[m][1]], utterance_mask)
                     for m in MODALITIES}
        return state

    def forward(self, text, audio, visual, utterance_mask, frame_mask=None, labels=None) -> ModelOutput:
        check_model_inputs(self.config, text, audio, visual, utterance_mask, frame_mask, labels)
        fused = self.fuse(self.encode(text, audio, visual, utterance_mask, frame_mask), utterance_mask)
        logits = self.classifier(torch.cat([fused[m] for m in MODALITIES], dim=-1))
        projections = {m: self.heads[m](fused[m]) for m in MODALITIES}
        features = {**{f"fused_{m}": fused[m] for m in MODALITIES},
                    **{f"proj_{m}": projections[m] for m in MODALITIES}}
        if labels is None:
            return ModelOutput(logits=logits, features=features)
        losses = mcncl_loss(self.config, logits, projections, labels, utterance_mask,
                            self.ops.supcon_hard_negative_loss)
        return ModelOutput(logits=logits, loss=losses["loss"], ce_loss=losses["ce_loss"],
                           contrastive_loss=losses["contrastive_loss"], features=features)


@functools.lru_cache(maxsize=32)
def _device_constants(values: tuple, device: torch.device) -> torch.Tensor:
    """Loss constants (α, β, γ; class weights) as a float32 tensor, made once per device: a host-to-device
    copy inside every step would cost a transfer per step and break CUDA graph capture."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def mcncl_loss(cfg: ModelConfig, logits, projections, labels, utterance_mask, supcon, gather_rows=None):
    """CE + α·L_t + β·L_a + γ·L_v over the valid utterances (DESIGN.md §3).

    Padded utterances stay in place with the ignore label (CE's and the SupCon op's ignore_index):
    static shapes, no boolean-mask gather, no host sync. projections: {"t", "a", "v"} -> [B, S, P];
    supcon: the SupCon op to use. `gather_rows(x, with_grad)` concatenates every process's rows
    (autograd-aware): with it the loss is that of the global batch under data parallelism
    (mcncl_fast.distributed); a `supcon` with the attribute `gathers_rows` gets this process's rows
    and gathers what it needs itself. Returns loss, ce_loss, contrastive_loss [3] and num_utterances
    (a 0-d tensor). With `cfg.class_weights` w the CE is sum_i w_{y_i} l_i / sum_i w_{y_i} over the valid
    utterances (F.cross_entropy's weighted mean).
    """
    targets = torch.where(utterance_mask, labels, IGNORE_INDEX).reshape(-1)
    class_weights = None if cfg.class_weights is None else _device_constants(cfg.class_weights, logits.device)
    # sum / count rather than mean: a batch with no valid utterance gives 0, not NaN
    ce_sum = F.cross_entropy(logits.reshape(targets.numel(), -1).float(), targets, weight=class_weights,
                             ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    if class_weights is not None:   # the weighted CE's normaliser sum_i w_{y_i}: a gather, no host sync
        weight_sum = (class_weights[targets.clamp(min=0)] * (targets != IGNORE_INDEX)).sum()
    z = torch.stack([projections[m].reshape(targets.numel(), -1) for m in MODALITIES])   # [3, B·S, P]
    gathers = getattr(supcon, "gathers_rows", False)   # such an op gathers what it needs itself
    if gather_rows is not None:
        if not gathers:
            z = gather_rows(z.float().transpose(0, 1).contiguous(), with_grad=True).transpose(0, 1)
            targets = gather_rows(targets, with_grad=False)
        ce_sum = gather_rows(ce_sum.reshape(1), with_grad=True).sum()
        count = gather_rows(count.reshape(1), with_grad=False).sum()
        if class_weights is not None:
            weight_sum = gather_rows(weight_sum.reshape(1), with_grad=False).sum()
    if class_weights is None:
        ce = ce_sum / count.clamp(min=1)
    else:
        ce = ce_sum / torch.where(weight_sum > 0, weight_sum, 1.0)
    contrastive = supcon(z, targets, cfg.temperature, cfg.hard_ratio,
                         ignore_index=IGNORE_INDEX, num_classes=cfg.num_classes)
    weights = _device_constants((cfg.alpha, cfg.beta, cfg.gamma), contrastive.device)
    return {"loss": ce + (weights * contrastive).sum(), "ce_loss": ce, "contrastive_loss": contrastive,
            "num_utterances": count}


def check_model_inputs(cfg: ModelConfig, text, audio, visual, utterance_mask, frame_mask, labels):
    from .._checks import check_mask, check_same_device, check_shape, check_tensor
    check_tensor("text", text, ndim=3)
    b, s, _ = text.shape
    check_shape("text", text, (b, s, cfg.text_dim))
    check_tensor("audio", audio, ndim=3)
    check_shape("audio", audio, (b, s, cfg.audio_dim))
    check_tensor("visual", visual, ndim=4)
    if visual.shape[:2] != (b, s) or visual.shape[3] != cfg.visual_dim or visual.shape[2] < 1:
        raise ValueError(f"visual: expected shape ({b}, {s}, L>=1, {cfg.visual_dim}), got {tuple(visual.shape)}")
    check_same_device("text", text, audio=audio, visual=visual)
    if utterance_mask is None:
        raise ValueError("utterance_mask: required, a [B, S] bool tensor (True = real utterance)")
    check_mask("utterance_mask", utterance_mask, (b, s), text.device)
    check_mask("frame_mask", frame_mask, (b, s, visual.shape[2]), text.device)
    if labels is not None:
        check_tensor("labels", labels, ndim=2, dtypes=(torch.int64,))
        check_shape("labels", labels, (b, s))
        check_same_device("text", text, labels=labels)
        # a device-side assertion: immediate on the CPU, no host sync on CUDA
        bad = utterance_mask & (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= cfg.num_classes))
        try:
            torch._assert_async(~bad.any(), "labels: expected class ids in [0, num_classes) or the ignore label -100 "
                                            "at valid utterances")
        except RuntimeError:
            raise ValueError(f"labels: expected class ids in [0, {cfg.num_classes}) or {IGNORE_INDEX} "
                             "at valid utterances, "
                             f"got {labels[bad][:5].tolist()}") from None
