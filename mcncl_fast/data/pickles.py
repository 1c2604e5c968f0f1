"""Loaders for the pickled feature sets of the DialogueRNN / COSMIC literature.

IEMOCAP: a 9-tuple (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio,
videoVisual, videoSentence, trainVid, testVid); MELD: a 9-tuple (videoIDs,
videoSpeakers, videoLabels, videoText, videoAudio, videoSentence, trainVid,
testVid, _). Every dict is keyed by dialogue id with one entry per utterance.

* Text/audio: one feature row per utterance; dims are read from the data.
* Visual: an utterance-level vector becomes one frame (L = 1); a [frames, Dv]
  array per utterance keeps its frames (a [S, L, Dv] array per dialogue too).
* MELD has no visual features: every utterance gets ONE ALL-ZERO FRAME OF
  DIMENSION 1 (the visual stream then carries no information), unless
  `visual_path` names a file (pickle or torch.save) holding a dict
  {dialogue id: per-utterance visual features, in the formats above}.
* The files have no dev split: dev is carved from trainVid deterministically
  (`splits.carve_dev`: 10% of the train dialogues, fixed seed).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .dialogues import DataSplits, DialogueList
from .errors import UserError
from .splits import DEV_FRACTION, carve_dev

MELD_CLASSES = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
IEMOCAP_CLASSES = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
LAYOUTS = {
    "iemocap": ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
                "videoSentence", "trainVid", "testVid"),
    "meld": ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoSentence",
             "trainVid", "testVid", "_"),
}
CLASSES = {"iemocap": IEMOCAP_CLASSES, "meld": MELD_CLASSES}


def _layout_text(name: str) -> str:
    return f"a pickled {len(LAYOUTS[name])}-tuple ({', '.join(LAYOUTS[name])}) in the DialogueRNN/COSMIC " \
           f"{name.upper()} layout"


def read_object(path, what: str):
    """Unpickle (or torch.load for .pt/.pth) a file; any failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data-path: no such file: {path} (expected {what})")
    try:
        if path.suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=False)
        with open(path, "rb") as f:
            # latin1: the published IEMOCAP/MELD pickles were written by Python 2 (numpy arrays inside)
            return pickle.load(f, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, RuntimeError, OSError) as exc:
        raise UserError(f"{path}: truncated or not a readable pickle ({type(exc).__name__}); expected {what}") from None


def _rows(value, n: int, where: str) -> torch.Tensor:
    """Per-utterance vectors -> float32 [n, D]."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise UserError(f"{where}: expected {n} feature vectors of one length, got ragged or non-numeric data") from None
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
        raise UserError(f"{where}: expected shape ({n}, D) (one feature row per label), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def visual_frames(value, n: int, where: str) -> List[torch.Tensor]:
    """Per-utterance visual features -> list of n float32 [L_i, Dv] (vectors become L = 1)."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3):
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape[0] != n:
            raise UserError(f"{where}: expected {n} utterances, got an array of shape {arr.shape}")
        items = [a[None, :] if arr.ndim == 2 else a for a in arr]
    else:
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise UserError(f"{where}: expected a list of {n} per-utterance arrays ([Dv] or [frames, Dv]), "
                            f"got {type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}")
        items = []
        for a in value:
            try:
                a = np.asarray(a, dtype=np.float32)
            except (ValueError, TypeError):
                raise UserError(f"{where}: non-numeric visual features") from None
            items.append(a[None, :] if a.ndim == 1 else a)
    out = []
    for i, a in enumerate(items):
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise UserError(f"{where}[{i}]: expected a [Dv] vector or a [frames>=1, Dv] array, got shape {a.shape}")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def _sorted_ids(ids) -> list:
    return sorted(ids, key=lambda v: (type(v).__name__, v))


def load_erc_pickle(name: str, path, visual_path=None, dev_fraction: float = DEV_FRACTION) -> DataSplits:
    """DataSplits from an IEMOCAP or MELD DialogueRNN/COSMIC pickle (module docstring)."""
    if name not in LAYOUTS:
        raise ValueError(f"name: expected one of {sorted(LAYOUTS)}, got {name!r}")
    if path is None:
        raise UserError(f"--data-path: required for --dataset {name} (expected {_layout_text(name)})")
    expected = _layout_text(name)
    obj = read_object(path, expected)
    if not isinstance(obj, (tuple, list)) or len(obj) != len(LAYOUTS[name]):
        got = f"a {type(obj).__name__} of {len(obj)} items" if isinstance(obj, (tuple, list)) else f"a {type(obj).__name__}"
        raise UserError(f"{path}: expected {expected}, got {got}")
    fields = dict(zip(LAYOUTS[name], obj))
    for key in ("videoIDs", "videoLabels", "videoText", "videoAudio") + (("videoVisual",) if name == "iemocap" else ()):
        if not isinstance(fields[key], dict):
            raise UserError(f"{path}: {key} (item {LAYOUTS[name].index(key) + 1}) should be a dict keyed by dialogue id, "
                            f"got {type(fields[key]).__name__}; expected {expected}")
    visual_source: Optional[Dict] = fields.get("videoVisual")
    if visual_path is not None:
        visual_source = read_object(visual_path, "a dict {dialogue id: per-utterance visual features}")
        if not isinstance(visual_source, dict):
            raise UserError(f"{visual_path}: expected a dict {{dialogue id: per-utterance visual features}}, "
                            f"got {type(visual_source).__name__}")
    class_names = CLASSES[name]
    k = len(class_names)

    def dialogue(vid):
        where = f"{path}: dialogue {vid!r}"
        for key in ("videoLabels", "videoText", "videoAudio"):
            if vid not in fields[key]:
                raise UserError(f"{where}: missing from {key}")
        try:
            labels = torch.as_tensor(np.asarray(fields["videoLabels"][vid], dtype=np.int64).reshape(-1))
        except (ValueError, TypeError):
            raise UserError(f"{where}: videoLabels should be a list of integer class ids") from None
        n = len(labels)
        if n == 0:
            raise UserError(f"{where}: no utterances")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise UserError(f"{where}: labels should be class ids in [0, {k}) ({', '.join(class_names)}), "
                            f"got values in [{int(labels.min())}, {int(labels.max())}]")
        text = _rows(fields["videoText"][vid], n, f"{where}: videoText")
        audio = _rows(fields["videoAudio"][vid], n, f"{where}: videoAudio")
        if visual_source is None:
            visual = [torch.zeros(1, 1) for _ in range(n)]
        else:
            if vid not in visual_source:
                src = visual_path if visual_path is not None else f"{path}: videoVisual"
                raise UserError(f"{src}: no visual features for dialogue {vid!r}")
            visual = visual_frames(visual_source[vid], n, f"{where}: visual")
        return {"id": str(vid), "text": text, "audio": audio, "visual": visual, "labels": labels}

    for key in ("trainVid", "testVid"):
        if isinstance(fields[key], dict) or isinstance(fields[key], (str, bytes)):
            other = "IEMOCAP" if name == "meld" else "MELD"
            raise UserError(f"{path}: {key} (item {LAYOUTS[name].index(key) + 1}) should be a collection of dialogue "
                            f"ids, got a {type(fields[key]).__name__} (is this the {other} layout?); expected {expected}")
        try:
            fields[key] = _sorted_ids(fields[key])
        except TypeError:
            raise UserError(f"{path}: {key} should be a collection of dialogue ids; expected {expected}") from None
    train_ids, dev_ids = carve_dev(fields["trainVid"], dev_fraction)
    splits = {s: DialogueList([dialogue(v) for v in ids])
              for s, ids in (("train", train_ids), ("dev", dev_ids), ("test", fields["testVid"]))}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise UserError(f"{path}: trainVid and testVid must both be non-empty; expected {expected}")
    dims = {}
    for split in splits.values():
        for d in split.dialogues:
            these = {"text": d["text"].shape[1], "audio": d["audio"].shape[1]}
            these.update((f"visual (utterance {i})", v.shape[1]) for i, v in enumerate(d["visual"]))
            for key, dim in these.items():
                ref = dims.setdefault(key.split(" ")[0], dim)
                if ref != dim:
                    raise UserError(f"{path}: dialogue {d['id']!r}: {key} feature dim {dim} differs from "
                                    f"{ref} elsewhere in the data")
    return DataSplits(splits["train"], splits["dev"], splits["test"], list(class_names),
                      dims["text"], dims["audio"], dims["visual"])
