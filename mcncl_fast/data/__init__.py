"""Data sets: the embedded synthetic default and loaders for real feature files.

    synthetic  generated MELD-shaped conversations (no file needed)
    meld       MELD pickle: DialogueRNN 9-tuple, MMGCN/MM-DFN 10-tuple, COSMIC RoBERTa (layouts.py)
    iemocap    IEMOCAP pickle: DialogueRNN 9-tuple, COSMIC RoBERTa (layouts.py)
    features   our feature store folder (train/dev/test.safetensors, `python -m mcncl_fast extract`)
"""
from __future__ import annotations

from .buckets import ShapeBuckets
from .dialogues import DataSplits, DialogueList, collate_dialogues
from .errors import UserError
from .label_sets import IGNORE_LABEL, LABEL_SETS, check_label_set
from .layouts import LAYOUTS
from .pickles import IEMOCAP_CLASSES, load_erc_pickle
from .splits import DEV_FRACTION, carve_dev
from .store import FeatureStoreSplit, load_feature_store, write_split
from .synthetic import MELD_CLASSES, SyntheticConversations, synthetic_splits

__all__ = ["DataSplits", "DialogueList", "collate_dialogues", "ShapeBuckets",
           "SyntheticConversations", "synthetic_splits",
           "MELD_CLASSES", "IEMOCAP_CLASSES", "DATASETS", "load_dataset", "load_erc_pickle", "load_feature_store",
           "write_split", "FeatureStoreSplit", "carve_dev", "UserError"]

__all__ += ["LABEL_SETS", "IGNORE_LABEL", "LAYOUTS"]

DATASETS = ("synthetic", "meld", "iemocap", "features")


def load_dataset(name: str, path=None, seed: int = 0, synthetic_scale: float = 1.0, visual_path=None,
                 dev_fraction: float = DEV_FRACTION, label_set=None, roberta: str = "mean") -> DataSplits:
    """Splits of a named data set. `path` is the data file or folder for real data sets;
    `visual_path` an optional per-utterance visual feature file for the pickles (MELD has none).
    `label_set`: None (the data's own classes), "meld-sentiment" (MELD pickles with sentiment labels:
    negative, neutral, positive) or "iemocap-4" (IEMOCAP pickles: happy+excited -> happy, sad, neutral,
    angry; frustrated -> ignored, label -100); label_sets.py states the mappings. `roberta`: how the
    four RoBERTa arrays of a COSMIC pickle become the text stream (pickles.py; other files: "mean" only)."""
    if name in ("meld", "iemocap"):
        return load_erc_pickle(name, path, visual_path=visual_path, dev_fraction=dev_fraction, label_set=label_set,
                               roberta=roberta)
    if roberta != "mean" and name in DATASETS:
        raise UserError(f"--roberta {roberta}: only for COSMIC RoBERTa pickles (--dataset meld/iemocap), "
                        f"not --dataset {name}")
    check_label_set(label_set)
    if label_set is not None and name in DATASETS:
        raise UserError(f"label set {label_set}: only for --dataset meld/iemocap, not --dataset {name}")
    if name == "synthetic":
        return synthetic_splits(seed=seed, scale=synthetic_scale)
    if name == "features":
        if visual_path is not None:
            raise UserError("--visual-path: only for --dataset meld/iemocap (the feature store holds its own visual)")
        return load_feature_store(path, dev_fraction=dev_fraction)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
