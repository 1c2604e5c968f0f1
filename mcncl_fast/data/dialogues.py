"""Dialogue records, the padded batch of DESIGN.md §3, and the split container.

A dialogue is a dict:
    id      str
    text    float [S, Dt]
    audio   float [S, Da]
    visual  list of S float tensors [L_i, Dv], L_i >= 1 (per-frame features)
    labels  int64 [S]  class ids; -100 (IGNORE_LABEL) = not trained on, not scored (label_sets.py)
    speakers  int64 [S], optional: speaker index within the dialogue (the pickles only)
Every dataset (synthetic, MELD/IEMOCAP pickles, feature store) yields these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..reference.ops import IGNORE_INDEX


@dataclass
class DataSplits:
    train: Dataset
    dev: Dataset
    test: Dataset
    class_names: List[str]
    text_dim: int
    audio_dim: int
    visual_dim: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def model_dims(self) -> dict:
        """The ModelConfig fields a dataset decides."""
        return dict(text_dim=self.text_dim, audio_dim=self.audio_dim, visual_dim=self.visual_dim,
                    num_classes=self.num_classes)


class DialogueList(Dataset):
    """A dataset over an in-memory list of dialogue dicts."""

    def __init__(self, dialogues: Sequence[dict]):
        self.dialogues = list(dialogues)

    def __len__(self):
        return len(self.dialogues)

    def __getitem__(self, index):
        return self.dialogues[index]


def collate_dialogues(batch: Sequence[dict], shape: Optional[Tuple[int, int, int]] = None) -> Dict[str, torch.Tensor]:
    """Pad a list of dialogues to [B, S, ...] with utterance and frame masks (True = real).

    `shape` = (B, S, L): pad to at least these many dialogues, utterances per dialogue and frames per
    utterance (mcncl_fast.data.buckets: a few static shapes for torch.compile and CUDA graphs). Padded
    dialogues, utterances and frames are masked out; padded labels are the ignore label."""
    if len(batch) == 0:
        raise ValueError("batch: expected at least one dialogue, got an empty list")
    b = len(batch)
    s = max(len(d["labels"]) for d in batch)
    frames = max(v.shape[0] for d in batch for v in d["visual"])
    if shape is not None:
        if shape[0] < b:
            raise ValueError(f"shape: {shape[0]} dialogues requested, the batch holds {b}")
        b, s, frames = shape[0], max(s, shape[1]), max(frames, shape[2])
    dt, da, dv = batch[0]["text"].shape[1], batch[0]["audio"].shape[1], batch[0]["visual"][0].shape[1]
    text = torch.zeros(b, s, dt)
    audio = torch.zeros(b, s, da)
    visual = torch.zeros(b, s, frames, dv)
    utterance_mask = torch.zeros(b, s, dtype=torch.bool)
    frame_mask = torch.zeros(b, s, frames, dtype=torch.bool)
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.int64)
    for i, d in enumerate(batch):
        n = len(d["labels"])
        if d["text"].shape != (n, dt) or d["audio"].shape != (n, da) or len(d["visual"]) != n:
            raise ValueError(f"dialogue {d.get('id', i)!r}: inconsistent utterance counts or feature dims "
                             f"(labels {n}, text {tuple(d['text'].shape)}, audio {tuple(d['audio'].shape)}, "
                             f"visual {len(d['visual'])} utterances)")
        text[i, :n] = d["text"]
        audio[i, :n] = d["audio"]
        labels[i, :n] = d["labels"]
        utterance_mask[i, :n] = True
        for j, v in enumerate(d["visual"]):
            visual[i, j, : v.shape[0]] = v
            frame_mask[i, j, : v.shape[0]] = True
    return {"text": text, "audio": audio, "visual": visual, "utterance_mask": utterance_mask,
            "frame_mask": frame_mask, "labels": labels}
