"""Data sets: the embedded synthetic default and loaders for real feature files."""
from __future__ import annotations

from .dialogues import DataSplits, DialogueList, collate_dialogues
from .synthetic import MELD_CLASSES, SyntheticConversations, synthetic_splits

__all__ = ["DataSplits", "DialogueList", "collate_dialogues", "SyntheticConversations", "synthetic_splits",
           "MELD_CLASSES", "DATASETS", "load_dataset"]

DATASETS = ("synthetic",)


def load_dataset(name: str, path=None, seed: int = 0, synthetic_scale: float = 1.0) -> DataSplits:
    """Splits of a named data set. `path` is the data file or folder for real data sets."""
    if name == "synthetic":
        return synthetic_splits(seed=seed, scale=synthetic_scale)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
