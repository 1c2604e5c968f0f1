"""Data sets: the embedded synthetic default and loaders for real feature files.

    synthetic  generated MELD-shaped conversations (no file needed)
    meld       DialogueRNN/COSMIC MELD pickle (no visual: zero stream or --visual-path)
    iemocap    DialogueRNN/COSMIC IEMOCAP pickle
    features   our feature store folder (train/dev/test.safetensors, `python -m mcncl_fast extract`)
"""
from __future__ import annotations

from .dialogues import DataSplits, DialogueList, collate_dialogues
from .errors import UserError
from .pickles import IEMOCAP_CLASSES, load_erc_pickle
from .splits import DEV_FRACTION, carve_dev
from .store import FeatureStoreSplit, load_feature_store, write_split
from .synthetic import MELD_CLASSES, SyntheticConversations, synthetic_splits

__all__ = ["DataSplits", "DialogueList", "collate_dialogues", "SyntheticConversations", "synthetic_splits",
           "MELD_CLASSES", "IEMOCAP_CLASSES", "DATASETS", "load_dataset", "load_erc_pickle", "load_feature_store",
           "write_split", "FeatureStoreSplit", "carve_dev", "UserError"]

DATASETS = ("synthetic", "meld", "iemocap", "features")


def load_dataset(name: str, path=None, seed: int = 0, synthetic_scale: float = 1.0, visual_path=None,
                 dev_fraction: float = DEV_FRACTION) -> DataSplits:
    """Splits of a named data set. `path` is the data file or folder for real data sets;
    `visual_path` an optional per-utterance visual feature file for the pickles (MELD has none)."""
    if name == "synthetic":
        return synthetic_splits(seed=seed, scale=synthetic_scale)
    if name in ("meld", "iemocap"):
        return load_erc_pickle(name, path, visual_path=visual_path, dev_fraction=dev_fraction)
    if name == "features":
        if visual_path is not None:
            raise UserError("--visual-path: only for --dataset meld/iemocap (the feature store holds its own visual)")
        return load_feature_store(path, dev_fraction=dev_fraction)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
