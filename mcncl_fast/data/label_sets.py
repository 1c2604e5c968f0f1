"""Class lists of the ERC pickles and the label sets a loader can return instead of the native classes.

label_set=None            the file's own emotion classes
                            MELD (7): neutral, surprise, fear, sadness, joy, disgust, anger
                            IEMOCAP (6): happy, sad, neutral, angry, excited, frustrated
label_set="meld-sentiment" 3 classes negative (0), neutral (1), positive (2), from the sentiment labels
                          a MELD file carries (the last item of the DialogueRNN 9-tuple and of the
                          MMGCN/MM-DFN 10-tuple, `sentiment_labels` of COSMIC's RoBERTa pickle). The
                          files number sentiment as in the MELD README ("Labelling"): neutral 0,
                          positive 1, negative 2; the loader renumbers 0 -> 1, 1 -> 2, 2 -> 0.
label_set="iemocap-4"     4 classes happy (0), sad (1), neutral (2), angry (3) from IEMOCAP's 6:
                          happy and excited -> happy; sad, neutral, angry keep their ids;
                          frustrated (and any other class) -> IGNORE_LABEL: the utterance stays in its
                          dialogue, in order, as context, but is neither trained on nor scored.

In every file a label of -1 means "unlabelled" and becomes IGNORE_LABEL (-100), as does -100 itself.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .errors import UserError

IGNORE_LABEL = -100          # CE's and the SupCon op's ignore_index
UNLABELLED = -1              # read as IGNORE_LABEL

MELD_CLASSES = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
IEMOCAP_CLASSES = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
NATIVE_CLASSES = {"meld": MELD_CLASSES, "iemocap": IEMOCAP_CLASSES}

MELD_SENTIMENT_FILE_CLASSES = ["neutral", "positive", "negative"]     # the ids in the files
LABEL_SETS = ("meld-sentiment", "iemocap-4")
LABEL_SET_CLASSES = {"meld-sentiment": ["negative", "neutral", "positive"],
                     "iemocap-4": ["happy", "sad", "neutral", "angry"]}
# file label id -> returned id; ids absent from a mapping become IGNORE_LABEL
LABEL_SET_MAPS: Dict[str, Dict[int, int]] = {
    "meld-sentiment": {0: 1, 1: 2, 2: 0},
    "iemocap-4": {0: 0, 4: 0, 1: 1, 2: 2, 3: 3},
}
LABEL_SET_DATASET = {"meld-sentiment": "meld", "iemocap-4": "iemocap"}


def check_label_set(label_set: Optional[str], dataset: Optional[str] = None) -> None:
    """UserError unless `label_set` is None or one of LABEL_SETS (and fits `dataset` when given)."""
    if label_set is None:
        return
    if label_set not in LABEL_SETS:
        raise UserError(f"label set: expected one of {', '.join(LABEL_SETS)} (or none: the file's own classes), "
                        f"got {label_set!r}")
    if dataset is not None and LABEL_SET_DATASET[label_set] != dataset:
        raise UserError(f"label set {label_set}: only for {LABEL_SET_DATASET[label_set].upper()} pickles "
                        f"(--dataset {LABEL_SET_DATASET[label_set]}), not for --dataset {dataset}")


def class_names(dataset: str, label_set: Optional[str]) -> List[str]:
    return list(NATIVE_CLASSES[dataset] if label_set is None else LABEL_SET_CLASSES[label_set])


def remap(labels: torch.Tensor, label_set: Optional[str]) -> torch.Tensor:
    """File ids (already validated, IGNORE_LABEL for unlabelled) -> the label set's ids."""
    if label_set is None:
        return labels
    out = torch.full_like(labels, IGNORE_LABEL)
    for src, dst in LABEL_SET_MAPS[label_set].items():
        out[labels == src] = dst
    return out
