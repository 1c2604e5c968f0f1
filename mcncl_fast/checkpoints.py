"""Checkpoints: written atomically (a temp file in the same folder, then os.replace), checked when read."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .data.errors import UserError

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise UserError(f"checkpoint: {path} is not a readable mcncl_fast checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "mcncl_fast" or "model" not in state:
        raise UserError(f"checkpoint: {path} is not an mcncl_fast checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint: {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state
