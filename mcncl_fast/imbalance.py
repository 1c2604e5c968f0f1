"""Class weights for imbalanced data (`train --class-weights balanced`).

"balanced" follows scikit-learn's `compute_class_weight("balanced")`: class c gets
n / (K · n_c), with n the labelled utterances of the TRAINING split, K the number of classes and
n_c the utterances of class c (utterances labelled -1 / -100 are not counted). A class that never
occurs in the training split gets weight 0 (scikit-learn refuses such a class; it is never a training
target, so its weight does not enter the loss). The weights become `ModelConfig.class_weights`, and
the cross-entropy of both models becomes sum_i w_{y_i} l_i / sum_i w_{y_i} over the valid utterances
(reference/model.py `mcncl_loss`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .data import DataSplits, DialogueList, FeatureStoreSplit, SyntheticConversations
from .data.errors import UserError
from .data.label_sets import IGNORE_LABEL, UNLABELLED

CLASS_WEIGHTS = ("none", "balanced")


def split_labels(dataset) -> np.ndarray:
    """Every utterance label of a split (int64, ignored ones included), without reading the features."""
    if isinstance(dataset, DialogueList):
        parts = [np.asarray(d["labels"]) for d in dataset.dialogues]
    elif isinstance(dataset, SyntheticConversations):
        parts = [labels for labels, _, _ in dataset.structure]
    elif isinstance(dataset, FeatureStoreSplit):
        offsets = dataset.utterance_offsets
        parts = [dataset.labels[int(offsets[d]):int(offsets[d + 1])].numpy() for d in dataset.indices]
    else:   # any other Dataset of dialogue dicts
        parts = [np.asarray(dataset[i]["labels"]) for i in range(len(dataset))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> Tuple[float, ...]:
    """n / (K · n_c) per class c (scikit-learn's "balanced"); 0 for a class absent from `labels`."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    y = y[(y != IGNORE_LABEL) & (y != UNLABELLED)]
    if y.size == 0:
        raise UserError("--class-weights balanced: the training split has no labelled utterance")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels: expected class ids in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=num_classes)
    weights = np.where(counts > 0, y.size / (num_classes * np.maximum(counts, 1)), 0.0)
    return tuple(float(w) for w in weights)


def class_weights_for(mode: str, splits: DataSplits) -> Optional[Tuple[float, ...]]:
    """The `ModelConfig.class_weights` a `--class-weights` mode gives on these splits (None for "none")."""
    if mode not in CLASS_WEIGHTS:
        raise UserError(f"--class-weights: expected one of {', '.join(CLASS_WEIGHTS)}, got {mode!r}")
    if mode == "none":
        return None
    return balanced_class_weights(split_labels(splits.train), splits.num_classes)

