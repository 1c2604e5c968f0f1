"""Shape buckets: pad every batch to one of a few fixed shapes.

A dialogue batch is [B, S, L, ...] with S (utterances per dialogue) and L (frames per utterance)
set by its longest member, so nearly every batch has a new shape. `torch.compile` then recompiles
(or falls back to dynamic shapes) and a captured CUDA graph cannot be replayed. Rounding S and L up
to a short ladder of sizes, and B up to the batch size (the last batch of an epoch is smaller),
leaves a handful of shapes: one compilation and one graph each. Padding is masked everywhere
(attention keys, PSA frames, both losses), so the loss and the gradients are those of the unpadded
batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .dialogues import collate_dialogues

UTTERANCE_SIZES = (8, 16, 24, 32, 48, 64, 96, 128)
FRAME_SIZES = (1, 2, 4, 8, 16, 32, 64)


def round_up(n: int, sizes: Sequence[int]) -> int:
    """The smallest size >= n; past the largest, the next multiple of the largest."""
    for size in sizes:
        if size >= n:
            return size
    top = sizes[-1]
    return -(-n // top) * top


@dataclass(frozen=True)
class ShapeBuckets:
    """batch_size: pad the dialogue count to it (None: keep the batch's own); utterances / frames:
    increasing sizes S and L are rounded up to."""
    batch_size: Optional[int] = None
    utterances: Tuple[int, ...] = UTTERANCE_SIZES
    frames: Tuple[int, ...] = FRAME_SIZES

    def __post_init__(self):
        for name in ("utterances", "frames"):
            sizes = tuple(getattr(self, name))
            if not sizes or any(not isinstance(v, int) or v < 1 for v in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"{name}: expected strictly increasing positive sizes, got {sizes!r}")
            object.__setattr__(self, name, sizes)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1 or None, got {self.batch_size!r}")

    def shape(self, batch: Sequence[dict]) -> Tuple[int, int, int]:
        """(B, S, L) the dialogues `batch` are padded to."""
        s = max(len(d["labels"]) for d in batch)
        frames = max(v.shape[0] for d in batch for v in d["visual"])
        b = len(batch) if self.batch_size is None else max(self.batch_size, len(batch))
        return b, round_up(s, self.utterances), round_up(frames, self.frames)

    def __call__(self, batch: Sequence[dict]) -> Dict[str, torch.Tensor]:
        """A collate_fn for DataLoader (picklable: works with worker processes)."""
        if len(batch) == 0:
            raise ValueError("batch: expected at least one dialogue, got an empty list")
        return collate_dialogues(batch, shape=self.shape(batch))
