"""Synthetic conversations shaped like MELD (the embedded default data set).

Labels follow a Markov chain over MELD's train class frequencies (an emotion
persists from one utterance to the next with probability `persistence`), so
dialogue context carries signal. Each utterance carries its class signal in
ONE randomly chosen modality at full strength and in the other two weakly;
some utterances carry none and can only be inferred from context. A single
modality therefore cannot match the fused model. Features are generated
lazily and deterministically from (seed, split, dialogue index).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .dialogues import DataSplits

MELD_CLASSES = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MELD_TRAIN_COUNTS = [4710, 1205, 268, 683, 1743, 271, 1109]
SPLIT_SIZES = {"train": 1039, "dev": 114, "test": 280}   # MELD's dialogue counts
SPLIT_OFFSET = {"train": 0, "dev": 1, "test": 2}


class SyntheticConversations(Dataset):
    def __init__(self, split: str = "train", num_dialogues: int | None = None, seed: int = 0,
                 text_dim: int = 768, audio_dim: int = 88, visual_dim: int = 1000,
                 max_utterances: int = 24, max_frames: int = 6, persistence: float = 0.5,
                 strong: float = 6.0, weak: float = 1.2, silent_fraction: float = 0.2, noise: float = 1.0):
        if split not in SPLIT_SIZES:
            raise ValueError(f"split: expected one of {sorted(SPLIT_SIZES)}, got {split!r}")
        self.split, self.seed = split, seed
        self.dims = {"t": text_dim, "a": audio_dim, "v": visual_dim}
        self.noise, self.max_frames = noise, max_frames
        n = SPLIT_SIZES[split] if num_dialogues is None else num_dialogues
        # class prototypes are shared by all splits: they depend on the seed only
        proto_rng = np.random.default_rng([seed, 99])
        self.prototypes = {}
        for m, dim in self.dims.items():
            p = proto_rng.standard_normal((len(MELD_CLASSES), dim))
            # unit-norm prototypes and isotropic noise: along a prototype the signal-to-noise ratio is
            # strength / noise whatever the dimension
            self.prototypes[m] = torch.from_numpy(p / np.linalg.norm(p, axis=1, keepdims=True)).float()
        prior = np.asarray(MELD_TRAIN_COUNTS, dtype=np.float64)
        prior /= prior.sum()
        rng = np.random.default_rng([seed, SPLIT_OFFSET[split]])
        self.structure = []
        for _ in range(n):
            length = int(np.clip(rng.geometric(1 / 9.0), 1, max_utterances))
            labels = np.empty(length, dtype=np.int64)
            for u in range(length):
                keep = u > 0 and rng.random() < persistence
                labels[u] = labels[u - 1] if keep else rng.choice(len(prior), p=prior)
            carrier = rng.integers(0, 3, size=length)                 # which modality is strong
            silent = rng.random(length) < silent_fraction              # no signal at all
            strength = np.where(np.arange(3)[None, :] == carrier[:, None], strong, weak)
            strength[silent] = 0.0
            frames = rng.integers(1, max_frames + 1, size=length)
            self.structure.append((labels, strength.astype(np.float32), frames))

    def __len__(self):
        return len(self.structure)

    def __getitem__(self, index):
        labels, strength, frames = self.structure[index]
        g = torch.Generator().manual_seed(hash((self.seed, SPLIT_OFFSET[self.split], index)) & 0x7FFFFFFF)
        y = torch.from_numpy(labels)
        s = torch.from_numpy(strength)
        out = {}
        for col, (m, key) in enumerate((("t", "text"), ("a", "audio"))):
            signal = s[:, col:col + 1] * self.prototypes[m][y]
            out[key] = signal + torch.randn(len(y), self.dims[m], generator=g) * self.noise
        dim = self.dims["v"]
        visual = []
        for u in range(len(y)):
            signal = s[u, 2] * self.prototypes["v"][y[u]]
            # per-frame noise is larger: averaging the frames recovers the signal
            noise = torch.randn(int(frames[u]), dim, generator=g) * (2.0 * self.noise)
            visual.append(signal + noise)
        return {"id": f"{self.split}-{index}", "text": out["text"], "audio": out["audio"],
                "visual": visual, "labels": y}


def synthetic_splits(seed: int = 0, scale: float = 1.0, **kwargs) -> DataSplits:
    """train/dev/test with MELD's dialogue counts times `scale`."""
    def make(split):
        return SyntheticConversations(split, max(2, round(SPLIT_SIZES[split] * scale)), seed=seed, **kwargs)
    train = make("train")
    return DataSplits(train, make("dev"), make("test"), list(MELD_CLASSES),
                      train.dims["t"], train.dims["a"], train.dims["v"])
