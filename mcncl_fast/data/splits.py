"""Deterministic dev split carved from train when a data file has none."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

DEV_FRACTION = 0.1
DEV_SPLIT_SEED = 20240607   # fixed: the carved dev split does not change with the training --seed


def carve_dev(train_ids: Sequence, fraction: float = DEV_FRACTION) -> Tuple[List, List]:
    """(train, dev): a fixed seeded permutation of the sorted ids; the first `fraction` becomes dev.

    Independent of the training seed, of the order of the ids in the file and of
    the machine, so every run on the same file evaluates on the same dev dialogues.
    """
    ids = sorted(train_ids, key=str)
    if len(ids) < 2:
        return list(ids), []
    n_dev = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    order = np.random.default_rng(DEV_SPLIT_SEED).permutation(len(ids))
    dev = set(order[:n_dev].tolist())
    return [v for i, v in enumerate(ids) if i not in dev], [v for i, v in enumerate(ids) if i in dev]
