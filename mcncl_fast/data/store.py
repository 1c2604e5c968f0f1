"""Our feature store: one safetensors file per split, ragged arrays + an index.

`DIR/{train,dev,test}.safetensors`, each holding

    text               float [U, Dt]     one row per utterance, dialogues back to back
    audio              float [U, Da]
    visual             float [F, Dv]     one row per frame, utterances back to back
    labels             int64 [U]
    utterance_offsets  int64 [D + 1]     dialogue d = utterances offsets[d]:offsets[d+1]
    frame_offsets      int64 [U + 1]     utterance u = frames offsets[u]:offsets[u+1]

and string metadata: format "mcncl_fast.features", version, split, class_names,
dialogue_ids, utterance_ids (JSON) and `extra` (JSON: e.g. the extraction
options and the clips that were skipped). No padding is stored. Reading is lazy:
the file stays memory-mapped and a dialogue's rows are sliced out on access, so
MELD-size per-frame data costs page cache, not resident memory. Float features
may be stored as float16 (`dtype=`); they are returned as float32.
When `dev.safetensors` is absent, dev is carved from train (`splits.carve_dev`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .dialogues import DataSplits
from .._files import atomic_path
from .errors import UserError
from .splits import DEV_FRACTION, carve_dev
from .validation import validate_feature_store

STORE_FORMAT = "mcncl_fast.features"
STORE_VERSION = 1
SPLITS = ("train", "dev", "test")
TENSORS = ("text", "audio", "visual", "labels", "utterance_offsets", "frame_offsets")
EXPECTED = (f"a mcncl_fast feature store file (safetensors, format {STORE_FORMAT!r}, version {STORE_VERSION}) "
            f"as written by `python -m mcncl_fast extract` or mcncl_fast.data.store.write_split")


def split_path(directory, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


def write_split(path, dialogues: Iterable[dict], class_names: Sequence[str], split: str = "train",
                dtype: torch.dtype = torch.float32, extra: Optional[dict] = None) -> Path:
    """Write dialogues (the dict format of data/dialogues.py) as one store file, atomically."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    text, audio, visual, labels, utt_off, frame_off, ids, utt_ids = [], [], [], [], [0], [0], [], []
    dims = None
    for d in dialogues:
        n = len(d["labels"])
        v_dims = {v.shape[1] for v in d["visual"]}
        these = (d["text"].shape[1], d["audio"].shape[1], next(iter(v_dims)) if v_dims else None)
        if d["text"].shape[0] != n or d["audio"].shape[0] != n or len(d["visual"]) != n or len(v_dims) > 1:
            raise ValueError(f"dialogue {d.get('id')!r}: inconsistent utterance counts or visual dims")
        if dims is None:
            dims = these
        elif these != dims:
            raise ValueError(f"dialogue {d.get('id')!r}: feature dims {these} differ from {dims}")
        text.append(torch.as_tensor(d["text"]).to(dtype))
        audio.append(torch.as_tensor(d["audio"]).to(dtype))
        for v in d["visual"]:
            if v.shape[0] < 1:
                raise ValueError(f"dialogue {d.get('id')!r}: an utterance with no visual frame")
            visual.append(torch.as_tensor(v).to(dtype))
            frame_off.append(frame_off[-1] + v.shape[0])
        labels.append(torch.as_tensor(d["labels"], dtype=torch.int64))
        utt_off.append(utt_off[-1] + n)
        ids.append(str(d.get("id", len(ids))))
        utt_ids.append([str(u) for u in d.get("utterance_ids", range(n))])
    dt, da, dv = dims if dims is not None else (1, 1, 1)
    tensors = {
        "text": torch.cat(text) if text else torch.zeros(0, dt, dtype=dtype),
        "audio": torch.cat(audio) if audio else torch.zeros(0, da, dtype=dtype),
        "visual": torch.cat(visual) if visual else torch.zeros(0, dv, dtype=dtype),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        "utterance_offsets": torch.tensor(utt_off, dtype=torch.int64),
        "frame_offsets": torch.tensor(frame_off, dtype=torch.int64),
    }
    meta = {"format": STORE_FORMAT, "version": str(STORE_VERSION), "split": split,
            "class_names": json.dumps(list(class_names)), "dialogue_ids": json.dumps(ids),
            "utterance_ids": json.dumps(utt_ids), "extra": json.dumps(extra or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    return path


class FeatureStoreSplit(Dataset):
    """A lazily read store file; `indices` selects a subset of its dialogues (carved dev split)."""

    def __init__(self, path, indices: Optional[Sequence[int]] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"--data-path: no such file: {self.path} (expected {EXPECTED})")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != STORE_FORMAT or not set(TENSORS) <= keys:
                    raise UserError(f"{self.path}: not a feature store file; expected {EXPECTED}")
                if meta.get("version") != str(STORE_VERSION):
                    raise UserError(f"{self.path}: feature store version {meta.get('version')}, expected {EXPECTED}")
                self.labels = f.get_tensor("labels")
                self.utterance_offsets = f.get_tensor("utterance_offsets")
                self.frame_offsets = f.get_tensor("frame_offsets")
                self.dims = tuple(int(f.get_slice(k).get_shape()[1]) for k in ("text", "audio", "visual"))
                rows = {k: int(f.get_slice(k).get_shape()[0]) for k in ("text", "audio", "visual")}
            self.class_names = json.loads(meta["class_names"])
            self.dialogue_ids = json.loads(meta["dialogue_ids"])
            self.utterance_ids = json.loads(meta.get("utterance_ids", "[]"))
            self.extra = json.loads(meta.get("extra", "{}"))
            self.split = meta.get("split")
        except UserError:
            raise
        except Exception as exc:  # truncated file, bad header, bad JSON
            raise UserError(f"{self.path}: unreadable or truncated ({type(exc).__name__}); "
                            f"expected {EXPECTED}") from None
        u, d = len(self.labels), len(self.dialogue_ids)
        if (len(self.utterance_offsets) != d + 1 or int(self.utterance_offsets[-1]) != u or rows["text"] != u
                or rows["audio"] != u or len(self.frame_offsets) != u + 1
                or int(self.frame_offsets[-1]) != rows["visual"]):
            raise UserError(f"{self.path}: inconsistent index (offsets do not match the arrays); expected {EXPECTED}")
        self.indices = list(range(d)) if indices is None else list(indices)
        self._handle, self._pid = None, None

    def _file(self):
        # one memory-mapped handle per process (DataLoader workers open their own)
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = safe_open(str(self.path), framework="pt"), os.getpid()
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = state["_pid"] = None
        return state

    def __len__(self):
        return len(self.indices)

    def subset(self, indices: Sequence[int]) -> "FeatureStoreSplit":
        out = object.__new__(FeatureStoreSplit)
        out.__dict__.update(self.__getstate__())
        out.indices = [self.indices[i] for i in indices]
        return out

    def __getitem__(self, index):
        d = self.indices[index]
        a, b = int(self.utterance_offsets[d]), int(self.utterance_offsets[d + 1])
        f = self._file()
        fo = self.frame_offsets[a:b + 1]
        frames = f.get_slice("visual")[int(fo[0]):int(fo[-1])].float()
        rel = (fo - fo[0]).tolist()
        return {"id": self.dialogue_ids[d],
                "text": f.get_slice("text")[a:b].float(), "audio": f.get_slice("audio")[a:b].float(),
                "visual": [frames[rel[i]:rel[i + 1]] for i in range(b - a)],
                "labels": self.labels[a:b].clone()}


def load_feature_store(directory, dev_fraction: float = DEV_FRACTION) -> DataSplits:
    if directory is None:
        raise UserError("--data-path: required for --dataset features (a folder with train/dev/test.safetensors)")
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--data-path: {directory} is not a folder; expected a folder holding "
                        f"{', '.join(s + '.safetensors' for s in SPLITS)} (dev optional)")
    for split in ("train", "test"):
        if not split_path(directory, split).is_file():
            raise UserError(f"--data-path: {directory} has no {split}.safetensors; expected {EXPECTED} per split")
    train = FeatureStoreSplit(split_path(directory, "train"))
    test = FeatureStoreSplit(split_path(directory, "test"))
    if split_path(directory, "dev").is_file():
        dev = FeatureStoreSplit(split_path(directory, "dev"))
    else:
        keep, carved = carve_dev(range(len(train)), dev_fraction)
        train, dev = train.subset(keep), train.subset(carved)
    for part in (dev, test):
        if part.class_names != train.class_names or (len(part.labels) and part.dims != train.dims):
            raise UserError(f"{part.path}: class names {part.class_names} / dims {part.dims} differ from "
                            f"{train.path} ({train.class_names} / {train.dims})")
    validate_feature_store(train, dev, test)   # labels, finite values, duplicated ids (validation.py)
    return DataSplits(train, dev, test, list(train.class_names), *train.dims)
