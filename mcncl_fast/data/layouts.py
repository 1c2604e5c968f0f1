"""The pickled feature-set layouts of the ERC literature, recognised from the tuple's length and item kinds.

Each layout is the exact item order of the loader that reads it:

  iemocap-9          DialogueRNN / DialogueGCN / MMGCN / MM-DFN IEMOCAP_features.pkl
                     (declare-lab/conv-emotion DialogueRNN/dataloader.py IEMOCAPDataset,
                     zerohd4869/MM-DFN code/dataloader.py IEMOCAPDataset)
  meld-9             DialogueRNN / DialogueGCN MELD_features_raw.pkl; the last item holds the sentiment
                     labels (conv-emotion DialogueGCN/dataloader.py MELDDataset: videoLabelsSentiment;
                     DialogueRNN/dataloader.py MELDDataset reads it when n_classes == 3)
  meld-10            MMGCN / MM-DFN MELD_features_raw1.pkl: meld-9 with videoVisual inserted
                     (hujingwen6666/MMGCN dataloader.py, zerohd4869/MM-DFN code/dataloader.py MELDDataset)
  cosmic-iemocap-10  COSMIC iemocap_features_roberta.pkl (conv-emotion COSMIC/erc-training/dataloader.py
                     IEMOCAPRobertaCometDataset)
  cosmic-meld-11     COSMIC meld_features_roberta.pkl (MELDRobertaCometDataset; written by
                     COSMIC/feature-extraction/roberta_feature_extract_meld.py)

Item kinds: D a dict keyed by dialogue id, I a collection of dialogue ids (list, tuple, set, 1-D array),
S anything but a collection of ids (the sentiment dict, or None/a placeholder in files without it).
The kinds tell the layouts of one length apart (iemocap-9 vs meld-9 at item 7, meld-10 vs
cosmic-iemocap-10 at item 10).
"""
from __future__ import annotations

from collections.abc import KeysView
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import UserError

ROBERTA = ("roberta1", "roberta2", "roberta3", "roberta4")


@dataclass(frozen=True)
class Layout:
    key: str
    dataset: str                      # "iemocap" or "meld": the native classes
    source: str
    items: Tuple[str, ...]
    kinds: str                        # one of D, I, S per item
    speakers: str
    labels: str
    sentiment: Optional[str]          # the item holding sentiment labels (meld-sentiment), if any
    text: Tuple[str, ...]             # one item, or the four RoBERTa layers
    audio: Optional[str]
    visual: Optional[str]
    train: str
    test: str
    dev: Optional[str] = None         # the file's own dev split (else carved from train)

    def describe(self) -> str:
        article = "an" if len(self.items) in (8, 11, 18) else "a"
        return f"{self.key}: {article} {len(self.items)}-tuple ({', '.join(self.items)}) [{self.source}]"

    def mismatches(self, obj) -> list:
        return [i for i, (kind, value) in enumerate(zip(self.kinds, obj)) if not _is_kind(kind, value)]


_DIALOGUERNN = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio")
LAYOUTS = (
    Layout("iemocap-9", "iemocap", "DialogueRNN/DialogueGCN/MMGCN/MM-DFN IEMOCAP_features.pkl",
           _DIALOGUERNN + ("videoVisual", "videoSentence", "trainVid", "testVid"), "DDDDDDDII",
           "videoSpeakers", "videoLabels", None, ("videoText",), "videoAudio", "videoVisual", "trainVid", "testVid"),
    Layout("meld-9", "meld", "DialogueRNN/DialogueGCN MELD_features_raw.pkl",
           _DIALOGUERNN + ("videoSentence", "trainVid", "testVid", "videoSentiment"), "DDDDDDIIS",
           "videoSpeakers", "videoLabels", "videoSentiment", ("videoText",), "videoAudio", None, "trainVid", "testVid"),
    Layout("meld-10", "meld", "MMGCN/MM-DFN MELD_features_raw1.pkl",
           _DIALOGUERNN + ("videoVisual", "videoSentence", "trainVid", "testVid", "videoSentiment"), "DDDDDDDIIS",
           "videoSpeakers", "videoLabels", "videoSentiment", ("videoText",), "videoAudio", "videoVisual",
           "trainVid", "testVid"),
    Layout("cosmic-iemocap-10", "iemocap", "COSMIC iemocap_features_roberta.pkl",
           ("speakers", "labels") + ROBERTA + ("sentences", "trainIds", "testIds", "validIds"), "DDDDDDDIII",
           "speakers", "labels", None, ROBERTA, None, None, "trainIds", "testIds", "validIds"),
    Layout("cosmic-meld-11", "meld", "COSMIC meld_features_roberta.pkl",
           ("speakers", "emotion_labels", "sentiment_labels") + ROBERTA + ("sentences", "trainIds", "testIds",
                                                                            "validIds"), "DDDDDDDDIII",
           "speakers", "emotion_labels", "sentiment_labels", ROBERTA, None, None, "trainIds", "testIds", "validIds"),
)
_KIND_TEXT = {"D": "a dict keyed by dialogue id", "I": "a list/set of dialogue ids",
              "S": "sentiment labels (a dict) or a placeholder"}


def _is_ids(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, (list, tuple, set, frozenset, range, KeysView))


def _is_kind(kind: str, value) -> bool:
    if kind == "D":
        return isinstance(value, dict)
    if kind == "I":
        return _is_ids(value)
    return not _is_ids(value)


def accepted(dataset: Optional[str] = None) -> str:
    """The accepted layouts (of one dataset, or all) as one line."""
    chosen = [lay for lay in LAYOUTS if dataset is None or lay.dataset == dataset]
    what = f"one of the {dataset.upper()} layouts" if dataset else "one of the accepted layouts"
    return f"{what}: " + "; ".join(lay.describe() for lay in chosen)


def detect_layout(obj, dataset: str, path) -> Layout:
    """The layout `obj` (an unpickled file) has; UserError naming the accepted layouts if none fits."""
    if not isinstance(obj, (tuple, list)):
        raise UserError(f"{path}: got a {type(obj).__name__}, expected a pickled tuple; {accepted()}")
    same_length = [lay for lay in LAYOUTS if len(lay.items) == len(obj)]
    fits = [lay for lay in same_length if not lay.mismatches(obj)]
    if not fits:
        got = f"a {type(obj).__name__} of {len(obj)} items"
        if not same_length:
            raise UserError(f"{path}: got {got}; expected {accepted()}")
        # the closest layout (fewest wrong items, the requested dataset first) says what is wrong
        near = min(same_length, key=lambda lay: (len(lay.mismatches(obj)), lay.dataset != dataset))
        i = near.mismatches(obj)[0]
        raise UserError(f"{path}: got {got} that fits no accepted layout: item {i + 1} ({near.items[i]}) of the "
                        f"{near.key} layout should be {_KIND_TEXT[near.kinds[i]]}, got a {type(obj[i]).__name__}; "
                        f"expected {accepted()}")
    layout = fits[0]
    if layout.dataset != dataset:
        raise UserError(f"{path}: this file has the {layout.key} layout ({layout.source}), not a "
                        f"{dataset.upper()} one (is this the {layout.dataset.upper()} layout? then use "
                        f"--dataset {layout.dataset}); expected {accepted(dataset)}")
    return layout
