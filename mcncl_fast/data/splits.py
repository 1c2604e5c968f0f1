"""Deterministic dev split carved from train when a data file has none."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError

DEV_FRACTION = 0.1
DEV_SPLIT_SEED = 20240607   # fixed: the carved dev split does not change with the training --seed


def carve_dev(train_ids: Sequence, fraction: float = DEV_FRACTION, where: Optional[str] = None) -> Tuple[List, List]:
    """(train, dev): a fixed seeded permutation of the sorted ids; the first `fraction` becomes dev.

    Independent of the training seed, of the order of the ids in the file and of
    the machine, so every run on the same file evaluates on the same dev dialogues.
    At least one dialogue goes to dev and one stays in train: fewer than 2 train
    dialogues would leave the dev split empty, which is a UserError (`where` names the source).
    """
    ids = sorted(train_ids, key=str)
    if len(ids) < 2:
        raise UserError(f"{where or 'train split'}: the dev split would be empty after carving it from "
                        f"{len(ids)} train dialogue(s) (the file has no dev split; carving needs at least 2)")
    n_dev = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    order = np.random.default_rng(DEV_SPLIT_SEED).permutation(len(ids))
    dev = set(order[:n_dev].tolist())
    return [v for i, v in enumerate(ids) if i not in dev], [v for i, v in enumerate(ids) if i in dev]
