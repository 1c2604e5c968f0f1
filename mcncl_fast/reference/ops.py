"""The specification: plain PyTorch versions of every op (DESIGN.md §4).

Short and obviously right, never optimised. The fast ops in `mcncl_fast.ops`
must agree with these within the tolerances of DESIGN.md §6.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .._autocast import matmul_class, reduction_class
from .._checks import check_attention_args, check_attention_grouped_args, check_psa_args, check_supcon_args

__all__ = ["psa", "psa_pool", "attention", "attention_grouped", "supcon_hard_negative_loss",
           "hard_negative_counts", "label_statistics", "tie_tolerance", "TIE_TOLERANCE", "IGNORE_INDEX"]


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
# Tie tolerance of the hard-negative selection, relative to the largest squared norm of the rows
# (the bound of |s_ij|): 2^-18 for unit vectors, far above the few-ulp differences between two
# implementations' summation orders, far below any meaningful gap between similarities.
TIE_TOLERANCE = 2.0 ** -18
IGNORE_INDEX = -100


class LabelStats(NamedTuple):
    """Per-row label statistics of the SupCon op, int64 [N] on labels' device."""
    class_ids: torch.Tensor   # dense class id, -1 for ignored rows
    k: torch.Tensor           # k_i, the number of hard negatives (0 for ignored rows / no negatives)
    positives: torch.Tensor   # |P_i|
    negatives: torch.Tensor   # |Neg_i|


def label_statistics(labels: torch.Tensor, hard_ratio: float, ignore_index: int = IGNORE_INDEX,
                     num_classes: Optional[int] = None) -> LabelStats:
    """Class ids, k_i, |P_i| and |Neg_i| of every row (rows labelled `ignore_index` are neither anchors
    nor candidates). With `num_classes` (labels in [0, num_classes) or ignore_index) everything stays
    on the device: no host-device synchronisation. Shared by the reference and the fast ops."""
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    if num_classes is None:
        classes, inverse = torch.unique(torch.where(valid, labels, ignore_index), return_inverse=True)
        num_classes = classes.numel()
    else:
        inverse = labels.clamp(0, max(num_classes - 1, 0))
    ids = torch.where(valid, inverse, -1)
    sizes = torch.zeros(max(num_classes, 1), dtype=torch.int64, device=labels.device)
    sizes.index_add_(0, ids.clamp(min=0), valid.long())
    class_negatives = valid.sum() - sizes
    # k = min(n, max(1, ceil(r * n - 1e-6))) for n > 0, in float64 as Python's math.ceil would
    k_class = torch.ceil(hard_ratio * class_negatives.double() - 1e-6).long().clamp(min=1)
    k_class = torch.where(class_negatives > 0, torch.minimum(k_class, class_negatives), 0)
    row_class = ids.clamp(min=0)
    zero = torch.zeros_like(ids)
    return LabelStats(ids, torch.where(valid, k_class[row_class], zero),
                      torch.where(valid, sizes[row_class] - 1, zero),
                      torch.where(valid, class_negatives[row_class], zero))


def hard_negative_counts(labels: torch.Tensor, hard_ratio: float, ignore_index: int = IGNORE_INDEX,
                         num_classes: Optional[int] = None) -> torch.Tensor:
    """k_i of every anchor: int64 [N] on labels' device (0 for ignored rows). k_i depends only on the
    anchor's class, so it is computed once per class."""
    return label_statistics(labels, hard_ratio, ignore_index, num_classes).k


def tie_tolerance(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """delta = TIE_TOLERANCE * max ||z_i||^2 over the valid rows: [..., N, D] -> [...] (not differentiated)."""
    with torch.no_grad():
        sq = (z * z).sum(dim=-1).masked_fill(~valid, 0.0)
        return TIE_TOLERANCE * sq.amax(dim=-1) if sq.shape[-1] else sq.sum(dim=-1)


def _supcon_single(z, stats: LabelStats, temperature, normalize):
    z = z.to(_accumulation_dtype(z.dtype))
    if normalize:
        z = F.normalize(z, dim=-1, eps=1e-12)
    n = z.shape[0]
    ids, k = stats.class_ids, stats.k
    valid = ids >= 0
    sim = z @ z.T                                                          # [N, N]
    same = ids[:, None] == ids[None, :]
    positive = same & valid[:, None] & ~torch.eye(n, dtype=torch.bool, device=z.device)
    negative = ~same & valid[:, None] & valid[None, :]
    # threshold t_i: the k_i-th largest negative similarity (selection is not differentiated);
    # negatives within the tie tolerance below t_i count as tied with it
    with torch.no_grad():
        ranked = sim.masked_fill(~negative, float("-inf")).sort(dim=1, descending=True).values
        threshold = ranked.gather(1, (k - 1).clamp(min=0)[:, None]) - tie_tolerance(z, valid)
    hard = negative & (sim >= threshold) & (k > 0)[:, None]
    logits = sim / temperature
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    # anchors without positives are dropped; give them a finite dummy row so no NaN reaches the gradient
    in_denominator = (hard | positive) | ~has_pos[:, None]
    log_denominator = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=1)
    pos_logit_sum = (logits * positive).sum(dim=1)
    per_anchor = -(pos_logit_sum - n_pos * log_denominator) / n_pos.clamp(min=1)
    # mean over anchors with a positive; 0 (with a zero gradient) when there is none
    return torch.where(has_pos, per_anchor, 0.0).sum() / has_pos.sum().clamp(min=1)


@reduction_class
def supcon_hard_negative_loss(z, labels, temperature: float = 0.07, hard_ratio: float = 0.3,
                              normalize: bool = True, ignore_index: int = IGNORE_INDEX,
                              num_classes: Optional[int] = None):
    """Supervised contrastive loss over the hardest negatives (paper eq. 26).

    z: [N, D] -> scalar, or [M, N, D] -> [M] (M modalities sharing labels). Rows labelled
    `ignore_index` are neither anchors nor candidates. Loss in float32 (float64 for float64 inputs).
    """
    check_supcon_args(z, labels, temperature, hard_ratio, ignore_index, num_classes)
    stats = label_statistics(labels, hard_ratio, ignore_index, num_classes)
    if z.dim() == 2:
        return _supcon_single(z, stats, temperature, normalize)
    return torch.stack([_supcon_single(zm, stats, temperature, normalize) for zm in z])
