"""Loaders for the pickled feature sets of the ERC literature (DialogueRNN, MMGCN/MM-DFN, COSMIC).

The layout is recognised from the tuple (layouts.py lists them with their item order and sources);
`--dataset meld|iemocap` must match it. Every dict is keyed by dialogue id with one entry per utterance.

* Text/audio: a [S, D] array per dialogue or a list of S vectors; dims are read from the data.
* COSMIC RoBERTa pickles hold four text arrays (roberta1 = the last layer's CLS vector, roberta2 the one
  before, ...). `roberta` picks what becomes the text stream: "mean" (default: COSMIC's own default,
  --mode1 2, (r1 + r2 + r3 + r4) / 4; the text dim stays 1024), "concat" (4 x 1024, COSMIC's --mode1 0)
  or one layer ("roberta1" .. "roberta4").
* Visual: an utterance-level vector becomes one frame (L = 1; the MMGCN/MM-DFN MELD 342-d vectors, the
  IEMOCAP ones); a [frames, Dv] array per utterance keeps its frames (a [S, L, Dv] array per dialogue too).
* Files without audio (COSMIC) get an ALL-ZERO AUDIO VECTOR OF DIMENSION 1 per utterance; files without
  visual (DialogueRNN MELD, COSMIC) ONE ALL-ZERO FRAME OF DIMENSION 1, unless `visual_path` names a file
  (pickle or torch.save) holding a dict {dialogue id: per-utterance visual features, in the formats above}.
  Such a stream carries no information.
* Speakers: letters ("M"/"F": M -> 0, F -> 1 as the peers' one-hot [1, 0] / [0, 1]; other letters are
  numbered in order of appearance within the dialogue) or one-hot lists -> the dialogue's "speakers"
  (int64 [S]).
* Splits: COSMIC's validIds is the dev split; the other files have none, so dev is carved from trainVid
  deterministically (`splits.carve_dev`: 10% of the train dialogues, fixed seed).
* Labels: `label_set` (label_sets.py): None (the native classes), "meld-sentiment", "iemocap-4".
* validation.py checks what is read (labels, finiteness, dims, split ids); errors are one-line UserErrors.
Pickles are read with a restricted unpickler (mcncl_fast/data/safe_pickle.py): arrays, lists, dicts, strings and
numbers only; `--trust-pickle` lifts it for files from a source you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from . import safe_pickle, validation
from .dialogues import DataSplits, DialogueList
from .errors import UserError
from .label_sets import IEMOCAP_CLASSES, MELD_CLASSES, MELD_SENTIMENT_FILE_CLASSES, NATIVE_CLASSES
from .label_sets import check_label_set, class_names, remap
from .layouts import LAYOUTS, Layout, accepted, detect_layout
from .splits import DEV_FRACTION, carve_dev

__all__ = ["load_erc_pickle", "read_object", "visual_frames", "ROBERTA_MODES", "LAYOUTS", "MELD_CLASSES",
           "IEMOCAP_CLASSES"]

ROBERTA_MODES = ("mean", "concat", "roberta1", "roberta2", "roberta3", "roberta4")


def read_object(path, what: str):
    """Unpickle (or torch.load for .pt/.pth) a file; any failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data-path: no such file: {path} (expected {what})")
    try:
        if path.suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=not safe_pickle.is_trusted())
        with open(path, "rb") as f:
            # latin1: the published IEMOCAP/MELD pickles were written by Python 2 (numpy arrays inside)
            return safe_pickle.load(f, encoding="latin1")
    except safe_pickle.RefusedPickle as exc:
        raise UserError(f"{path}: refused: the pickle would construct {exc}, which no feature file needs (it could "
                        f"run code); load it only if you trust it, with --trust-pickle") from None
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(f"{path}: refused: holds Python objects beyond tensors, arrays, numbers, strings, lists "
                            f"and dicts (it could run code); load it only if you trust it, with --trust-pickle"
                            ) from None
        raise UserError(f"{path}: truncated or not a readable pickle (UnpicklingError); expected {what}") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, RuntimeError, OSError) as exc:
        raise UserError(f"{path}: truncated or not a readable pickle ({type(exc).__name__}); expected {what}") from None


def _rows(value, n: int, where: str) -> torch.Tensor:
    """Per-utterance vectors (a [n, D] array or a list of n vectors) -> float32 [n, D]."""
    if isinstance(value, (list, tuple)):
        lengths = [np.size(v) if np.ndim(v) == 1 else -1 for v in value]
        if len(value) == n and len(set(lengths)) > 1:
            ref = max(set(lengths), key=lengths.count)
            i = next(i for i, length in enumerate(lengths) if length != ref)
            raise UserError(f"{where}, utterance {i}: expected a feature vector of length {ref} like the other "
                            f"utterances, got shape {np.shape(value[i])}")
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise UserError(f"{where}: expected {n} feature vectors of one length, "
                        "got ragged or non-numeric data") from None
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
        for i, a in enumerate(value):
            try:
                a = np.asarray(a, dtype=np.float32)
            except (ValueError, TypeError):
                raise UserError(f"{where}, utterance {i}: non-numeric or ragged visual features") from None
            items.append(a[None, :] if a.ndim == 1 else a)
    out = []
    for i, a in enumerate(items):
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise UserError(f"{where}, utterance {i}: expected a [Dv] vector or a [frames>=1, Dv] array, "
                            f"got shape {a.shape}")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def speaker_ids(value, n: int, where: str) -> torch.Tensor:
    """Speaker letters or one-hot rows (or integer ids) -> int64 [n] speaker index within the dialogue."""
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if items is None or len(items) != n:
        got = f"{len(items)} entries" if items is not None else f"a {type(value).__name__}"
        raise UserError(f"{where}: expected {n} speakers (one per label), got {got}")
    if all(isinstance(s, (str, bytes, np.str_)) for s in items):
        letters = [s.decode("latin1") if isinstance(s, bytes) else str(s) for s in items]
        if set(letters) <= {"M", "F"}:
            return torch.tensor([0 if s == "M" else 1 for s in letters], dtype=torch.int64)
        order: dict = {}
        return torch.tensor([order.setdefault(s, len(order)) for s in letters], dtype=torch.int64)
    try:
        arr = np.asarray(items, dtype=np.float64)
    except (ValueError, TypeError):
        raise UserError(f"{where}: speakers should be letters or one-hot lists of one length") from None
    if arr.ndim == 1 and np.all(arr == np.round(arr)) and np.all(arr >= 0):
        return torch.from_numpy(arr.astype(np.int64))
    if arr.ndim == 2:
        one_hot = np.all((arr == 0) | (arr == 1), axis=1) & (arr.sum(1) == 1)
        if one_hot.all():
            return torch.from_numpy(arr.argmax(1).astype(np.int64))
        i = int(np.flatnonzero(~one_hot)[0])
        raise UserError(f"{where}, utterance {i}: speaker {arr[i].tolist()} is not a one-hot vector")
    raise UserError(f"{where}: speakers should be letters or one-hot lists, got an array of shape {arr.shape}")


def _ids(fields: dict, item: str) -> list:
    ids = fields[item]
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _sorted(ids: list, item: str, path) -> list:
    try:
        return sorted(ids, key=lambda v: (type(v).__name__, v))
    except TypeError:
        raise UserError(f"{path}: {item} should be a collection of dialogue ids (strings or numbers)") from None


def _text(fields: dict, layout: Layout, vid, n: int, where: str, roberta: str) -> torch.Tensor:
    if len(layout.text) == 1:
        text = _rows(fields[layout.text[0]][vid], n, f"{where}: {layout.text[0]}")
        validation.check_finite(where, layout.text[0], text)
        return text
    chosen = layout.text if roberta in ("mean", "concat") else (roberta,)
    parts = []
    for item in chosen:
        part = _rows(fields[item][vid], n, f"{where}: {item}")
        validation.check_finite(where, item, part)
        parts.append(part)
    if len({p.shape[1] for p in parts}) > 1:
        raise UserError(f"{where}: the RoBERTa layers have different dims {[p.shape[1] for p in parts]}")
    if roberta == "mean":
        return (parts[0] + parts[1] + parts[2] + parts[3]) / 4
    return torch.cat(parts, dim=1)


def load_erc_pickle(name: str, path, visual_path=None, dev_fraction: float = DEV_FRACTION,
                    label_set: Optional[str] = None, roberta: str = "mean") -> DataSplits:
    """DataSplits from an IEMOCAP or MELD pickle in any layout of layouts.py (module docstring).

    label_set: None (native classes), "meld-sentiment" (MELD files with sentiment labels) or "iemocap-4"
    (label_sets.py states the mappings). roberta: how COSMIC's four text arrays become the text stream.
    """
    if name not in NATIVE_CLASSES:
        raise ValueError(f"name: expected one of {sorted(NATIVE_CLASSES)}, got {name!r}")
    check_label_set(label_set, name)
    if roberta not in ROBERTA_MODES:
        raise UserError(f"roberta: expected one of {', '.join(ROBERTA_MODES)}, got {roberta!r}")
    expected = accepted(name)
    if path is None:
        raise UserError(f"--data-path: required for --dataset {name} (expected {expected})")
    obj = read_object(path, expected)
    layout = detect_layout(obj, name, path)
    if roberta != "mean" and len(layout.text) == 1:
        raise UserError(f"roberta={roberta!r}: only for the COSMIC RoBERTa pickles; {path} has the {layout.key} layout")
    fields = dict(zip(layout.items, obj))
    label_item, file_classes = layout.labels, NATIVE_CLASSES[name]
    if label_set == "meld-sentiment":
        label_item, file_classes = layout.sentiment, MELD_SENTIMENT_FILE_CLASSES
        if not isinstance(fields[label_item], dict):
            raise UserError(f"{path}: label set meld-sentiment needs the sentiment labels, but item "
                            f"{layout.items.index(label_item) + 1} ({label_item}) of this {layout.key} file is a "
                            f"{type(fields[label_item]).__name__}, not a dict keyed by dialogue id")
    visual_source = fields.get(layout.visual) if layout.visual else None
    if visual_path is not None:
        visual_source = read_object(visual_path, "a dict {dialogue id: per-utterance visual features}")
        if not isinstance(visual_source, dict):
            raise UserError(f"{visual_path}: expected a dict {{dialogue id: per-utterance visual features}}, "
                            f"got {type(visual_source).__name__}")
    names = class_names(name, label_set)
    needed = (label_item, layout.speakers) + (layout.text if roberta in ("mean", "concat") else (roberta,)) \
        + ((layout.audio,) if layout.audio else ())

    def dialogue(vid):
        where = f"{path}: dialogue {vid!r}"
        for key in needed:
            if vid not in fields[key]:
                raise UserError(f"{where}: missing from {key}")
        labels = validation.label_tensor(fields[label_item][vid], len(file_classes), f"{where}: {label_item}",
                                         file_classes)
        n = len(labels)
        text = _text(fields, layout, vid, n, where, roberta)
        if layout.audio:
            audio = _rows(fields[layout.audio][vid], n, f"{where}: {layout.audio}")
            validation.check_finite(where, "audio", audio)
        else:
            audio = torch.zeros(n, 1)
        if visual_source is None:
            visual = [torch.zeros(1, 1) for _ in range(n)]
        else:
            if vid not in visual_source:
                src = visual_path if visual_path is not None else f"{path}: {layout.visual}"
                raise UserError(f"{src}: no visual features for dialogue {vid!r}")
            visual = visual_frames(visual_source[vid], n, f"{where}: visual")
            validation.check_finite(where, "visual", visual)
        return {"id": str(vid), "text": text, "audio": audio, "visual": visual,
                "labels": remap(labels, label_set),
                "speakers": speaker_ids(fields[layout.speakers][vid], n, f"{where}: {layout.speakers}")}

    ids = {"train": (layout.train, _ids(fields, layout.train)),
           "test": (layout.test, _ids(fields, layout.test))}
    if layout.dev and len(fields[layout.dev]):
        ids["dev"] = (layout.dev, _ids(fields, layout.dev))
    validation.check_split_ids(str(path), ids)
    if not ids["train"][1] or not ids["test"][1]:
        raise UserError(f"{path}: {layout.train} and {layout.test} must both be non-empty")
    order = {s: _sorted(v, item, path) for s, (item, v) in ids.items()}
    if "dev" not in order:
        order["train"], order["dev"] = carve_dev(order["train"], dev_fraction, where=f"{path}: {layout.train}")
    splits = {s: DialogueList([dialogue(v) for v in order[s]]) for s in ("train", "dev", "test")}
    dims = validation.check_dims(str(path), [d for s in splits.values() for d in s.dialogues])
    return DataSplits(splits["train"], splits["dev"], splits["test"], names, *dims)
