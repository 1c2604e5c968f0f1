"""Checks every loader runs on the data it reads: one-line UserErrors that name the dialogue and utterance.

* labels: whole-number class ids in [0, num_classes); -1 (unlabelled) and -100 become IGNORE_LABEL;
  a float label that is not a whole number (1.7) is an error, never truncated;
* features: finite values only (no NaN/Inf);
* feature dims: one text, one audio and one visual dim over the whole data set; the utterance whose
  dim differs from the most common one is named;
* split ids: no id twice in a split list, no id in two splits (pickles: every split indexes the same
  dicts, so a shared id is the same dialogue twice);
* the feature store: labels and finiteness per file (the scan reads each file once, in chunks), no
  duplicated dialogue id within a file. Ids may repeat across the store's split files: raw MELD numbers
  its dialogues from 0 in each split.
An empty carved dev split is refused by splits.carve_dev.
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UserError
from .label_sets import IGNORE_LABEL, UNLABELLED


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def label_problem(arr: np.ndarray, num_classes: int, class_names: Sequence[str] = ()) -> Optional[Tuple[int, str]]:
    """(index, what is wrong) of the first bad label in a 1-D array, or None."""
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = _first(bad)
            return i, f"label {arr[i].item()!r} is not a whole-number class id"
    elif arr.dtype.kind not in "iu":
        return 0, f"labels should be integer class ids, got {arr.dtype} values"
    ids = arr.astype(np.int64)
    bad = (ids != IGNORE_LABEL) & (ids != UNLABELLED) & ((ids < 0) | (ids >= num_classes))
    if bad.any():
        i = _first(bad)
        names = f" ({', '.join(class_names)})" if class_names else ""
        return i, (f"label {int(ids[i])} is not one of the class ids in [0, {num_classes}){names}; "
                   f"-1 or -100 mark an unlabelled utterance")
    return None


def label_tensor(raw, num_classes: int, where: str, class_names: Sequence[str] = ()) -> torch.Tensor:
    """One dialogue's labels -> int64 [S]; -1 and -100 -> IGNORE_LABEL."""
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError):
        arr = np.asarray([0, None])   # ragged: reported below as non-numeric
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise UserError(f"{where}: labels should be a list of integer class ids, got "
                        f"{'shape ' + str(arr.shape) if arr.ndim != 1 else str(arr.dtype) + ' values'}")
    if arr.size == 0:
        raise UserError(f"{where}: no utterances (an empty label list)")
    problem = label_problem(arr, num_classes, class_names)
    if problem is not None:
        raise UserError(f"{where}, utterance {problem[0]}: {problem[1]}")
    ids = torch.from_numpy(arr.astype(np.int64))
    ids[ids == UNLABELLED] = IGNORE_LABEL
    return ids


def check_finite(where: str, name: str, value) -> None:
    """`value`: a float [S, D] tensor (row = utterance) or a list of S [L, D] tensors (frames)."""
    if isinstance(value, torch.Tensor):
        bad = ~torch.isfinite(value).reshape(value.shape[0], -1).all(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise UserError(f"{where}, utterance {i}: non-finite {name} feature value "
                            f"({value[i][~torch.isfinite(value[i])][0].item()})")
        return
    for i, v in enumerate(value):
        if not torch.isfinite(v).all():
            raise UserError(f"{where}, utterance {i}: non-finite {name} feature value "
                            f"({v[~torch.isfinite(v)][0].item()})")


def check_split_ids(where: str, splits: Dict[str, Tuple[str, Sequence]]) -> None:
    """splits: split name -> (item name in the file, ids). No duplicates within, no id in two splits."""
    for split, (item, ids) in splits.items():
        try:
            counts = Counter(ids)
        except TypeError:
            raise UserError(f"{where}: {item} should hold hashable dialogue ids (strings or numbers)") from None
        dups = [v for v, c in counts.items() if c > 1]
        if dups:
            raise UserError(f"{where}: {item} lists dialogue id {dups[0]!r} {counts[dups[0]]} times "
                            f"({len(dups)} duplicated id(s) in the {split} split)")
    for (sa, (ia, a)), (sb, (ib, b)) in combinations(splits.items(), 2):
        both = set(a) & set(b)
        if both:
            first = sorted(both, key=lambda v: (type(v).__name__, str(v)))[0]
            raise UserError(f"{where}: dialogue id {first!r} is in both {ia} ({sa}) and {ib} ({sb}) "
                            f"({len(both)} shared id(s)); a dialogue must belong to one split")


def check_dims(where: str, dialogues: Sequence[dict]) -> Tuple[int, int, int]:
    """(text, audio, visual) dims, the same for every dialogue/utterance; else name the odd one out."""
    entries: Dict[str, List[Tuple[int, str]]] = {"text": [], "audio": [], "visual": []}
    for d in dialogues:
        entries["text"].append((d["text"].shape[1], f"dialogue {d['id']!r}"))
        entries["audio"].append((d["audio"].shape[1], f"dialogue {d['id']!r}"))
        entries["visual"].extend((v.shape[1], f"dialogue {d['id']!r}, utterance {i}")
                                 for i, v in enumerate(d["visual"]))
    dims = []
    for name, items in entries.items():
        if not items:
            raise UserError(f"{where}: no dialogues")
        counts = Counter(dim for dim, _ in items)
        ref, n_ref = counts.most_common(1)[0]
        for dim, loc in items:
            if dim != ref:
                unit = "utterances" if name == "visual" else "dialogues"
                raise UserError(f"{where}: {loc}: {name} feature dim {dim} differs from {ref}, the dim of "
                                f"{n_ref} other {unit}")
        dims.append(ref)
    return tuple(dims)


# ---------------------------------------------------------------------- the feature store
def _locate(store, utterance: int) -> str:
    d = int(torch.searchsorted(store.utterance_offsets, torch.tensor(utterance), right=True)) - 1
    return f"dialogue {store.dialogue_ids[d]!r}, utterance {utterance - int(store.utterance_offsets[d])}"


def _scan_finite(store, handle, name: str, chunk_elements: int = 1 << 24) -> None:
    sl = handle.get_slice(name)
    rows, width = sl.get_shape()[0], max(1, sl.get_shape()[1])
    step = max(1, chunk_elements // width)
    for a in range(0, rows, step):
        bad = ~torch.isfinite(sl[a:min(rows, a + step)].float()).all(1)
        if bad.any():
            row = a + int(bad.nonzero()[0])
            if name == "visual":   # frame row -> utterance
                row = int(torch.searchsorted(store.frame_offsets, torch.tensor(row), right=True)) - 1
            raise UserError(f"{store.path}: {_locate(store, row)}: non-finite {name} feature value")


def validate_feature_store(*parts) -> None:
    """Check FeatureStoreSplit objects (several may share a file: a carved dev); labels normalised in place."""
    from safetensors import safe_open

    by_path: Dict[str, list] = {}
    for p in parts:
        by_path.setdefault(str(p.path), []).append(p)
    for path, group in by_path.items():
        store = group[0]
        counts = Counter(store.dialogue_ids)
        dups = [v for v, c in counts.items() if c > 1]
        if dups:
            raise UserError(f"{path}: dialogue id {dups[0]!r} appears {counts[dups[0]]} times in this split file")
        labels = store.labels.numpy()
        problem = label_problem(labels.reshape(-1), len(store.class_names), store.class_names) \
            if labels.size else None
        if problem is not None:
            raise UserError(f"{path}: {_locate(store, problem[0])}: {problem[1]}")
        if store.labels.dtype != torch.int64 or bool((store.labels == UNLABELLED).any()):
            fixed = store.labels.to(torch.int64)
            fixed[fixed == UNLABELLED] = IGNORE_LABEL
            for p in group:
                p.labels = fixed
        with safe_open(path, framework="pt") as handle:
            for name in ("text", "audio", "visual"):
                _scan_finite(store, handle, name)
