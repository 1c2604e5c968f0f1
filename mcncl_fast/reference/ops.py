"""The specification: plain PyTorch versions of every op (DESIGN.md §4).

Short and obviously right, never optimised. The fast ops in `mcncl_fast.ops`
must agree with these within the tolerances of DESIGN.md §6.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._autocast import matmul_class, reduction_class
from .._checks import check_attention_args, check_attention_grouped_args, check_psa_args, check_supcon_args

__all__ = ["psa", "psa_pool", "attention", "attention_grouped", "supcon_hard_negative_loss",
           "hard_negative_counts"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit and float32 inputs accumulate in float32; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- PSA
@matmul_class
def psa(x, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Pyramid squeeze attention over frames. x: [N, L, C] -> [N, L, C]."""
    check_psa_args(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    n, length, channels = x.shape
    quarter = channels // 4
    if frame_mask is None:
        frame_mask = torch.ones(n, length, dtype=torch.bool, device=x.device)
    valid = frame_mask.unsqueeze(-1).to(x.dtype)                       # [N, L, 1]
    x = (x * valid).transpose(1, 2)                                     # [N, C, L]
    branches = []
    for s, (w, b) in enumerate(zip(weights, biases)):
        x_s = x[:, s * quarter:(s + 1) * quarter]
        branches.append(F.conv1d(x_s, w, b, padding=w.shape[-1] // 2))
    y = torch.cat(branches, dim=1).transpose(1, 2)                      # [N, L, C]
    count = valid.sum(dim=1).clamp(min=1)                               # [N, 1]
    squeezed = (y * valid).sum(dim=1) / count                           # [N, C]
    gate = torch.sigmoid(F.linear(F.relu(F.linear(squeezed, fc1_weight, fc1_bias)), fc2_weight, fc2_bias))
    return y * gate.unsqueeze(1) * valid


@matmul_class
def psa_pool(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask=None):
    """Masked mean over valid frames of `psa(...)`: [N, L, C] -> [N, C]. Fully padded rows give 0."""
    out = psa(x, weights, biases, fc1_weight, fc1_bias, fc2_weight, fc2_bias, frame_mask)
    if frame_mask is None:
        return out.mean(dim=1)
    valid = frame_mask.unsqueeze(-1).to(out.dtype)
    return (out * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


# --------------------------------------------------------------------- attention
@matmul_class
def attention(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """softmax(q kᵀ · scale) v with key padding (True = attend); fully masked rows give 0."""
    check_attention_args(q, k, v, key_padding_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale   # [B, H, Lq, Lk]
    if key_padding_mask is None:
        probs = scores.softmax(dim=-1)
    else:
        has_key = key_padding_mask.any(dim=-1, keepdim=True)                 # [B, 1]
        # A row with no valid key attends to everything, then is zeroed: finite values and gradients.
        attend = (key_padding_mask | ~has_key)[:, None, None, :]
        probs = scores.masked_fill(~attend, float("-inf")).softmax(dim=-1)
        probs = probs * has_key[:, None, :, None].to(probs.dtype)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


@matmul_class
def attention_grouped(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """G independent attentions: q [G, B, H, Lq, Dh], k/v [G, B, H, Lk, Dh], key_padding_mask
    [B, Lk] (shared by the groups) or [G, B, Lk]. Equals stacking attention(q[g], k[g], v[g], mask[g])."""
    check_attention_grouped_args(q, k, v, key_padding_mask, scale)
    g, b, h, lq, dh = q.shape
    lk = k.shape[3]
    mask = key_padding_mask
    if mask is not None:   # fold the groups into the batch
        mask = (mask.expand(g, b, lk) if mask.dim() == 2 else mask).reshape(g * b, lk)
    out = attention(q.reshape(g * b, h, lq, dh), k.reshape(g * b, h, lk, dh), v.reshape(g * b, h, lk, dh),
                    mask, scale)
    return out.reshape(g, b, h, lq, dh)


# ---------------------------------------------------------------------- SupCon
def hard_negative_counts(labels: torch.Tensor, hard_ratio: float) -> torch.Tensor:
    """k_i of DESIGN.md §4.3 for every anchor: int64 [N] on labels' device.

    k_i depends only on the anchor's class, so it is computed once per class.
    Shared by the reference and the fast implementations.
    """
    n = labels.numel()
    _, inverse, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    counts = []
    for size in class_sizes.tolist():
        negatives = n - size
        k = min(negatives, max(1, math.ceil(hard_ratio * negatives - 1e-6))) if negatives > 0 else 0
        counts.append(k)
    per_class = torch.tensor(counts, dtype=torch.int64, device=labels.device)
    return per_class[inverse.reshape(-1)]


def _supcon_single(z, labels, temperature, hard_ratio, normalize):
    z = z.to(_accumulation_dtype(z.dtype))
    if normalize:
        z = F.normalize(z, dim=-1, eps=1e-12)
    n = z.shape[0]
    sim = z @ z.T                                                          # [N, N]
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
    negative = ~same
    k = hard_negative_counts(labels, hard_ratio)
    # threshold t_i: the k_i-th largest negative similarity (selection is not differentiated)
    with torch.no_grad():
        ranked = sim.masked_fill(~negative, float("-inf")).sort(dim=1, descending=True).values
        threshold = ranked.gather(1, (k - 1).clamp(min=0)[:, None])
    hard = negative & (sim >= threshold) & (k > 0)[:, None]
    logits = sim / temperature
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    # anchors without positives are dropped; give them a finite dummy row so no NaN reaches the gradient
    in_denominator = (hard | positive) | ~has_pos[:, None]
    log_denominator = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=1)
    pos_logit_sum = (logits * positive).sum(dim=1)
    per_anchor = -(pos_logit_sum - n_pos * log_denominator) / n_pos.clamp(min=1)
    if not bool(has_pos.any()):
        return (sim * 0.0).sum()
    return per_anchor[has_pos].mean()


@reduction_class
def supcon_hard_negative_loss(z, labels, temperature: float = 0.07, hard_ratio: float = 0.3,
                              normalize: bool = True):
    """Supervised contrastive loss over the hardest negatives (paper eq. 26).

    z: [N, D] -> scalar, or [M, N, D] -> [M] (M modalities sharing labels). Loss in float32
    (float64 for float64 inputs).
    """
    check_supcon_args(z, labels, temperature, hard_ratio)
    labels = labels.long()
    if z.dim() == 2:
        return _supcon_single(z, labels, temperature, hard_ratio, normalize)
    return torch.stack([_supcon_single(zm, labels, temperature, hard_ratio, normalize) for zm in z])
