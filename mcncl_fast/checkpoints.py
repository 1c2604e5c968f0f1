"""Checkpoints: written atomically (a temp file in the same folder, then os.replace), checked when read."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from .data.errors import UserError

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename. A full disk or a folder that
    became unwritable is a one-line error; the previous file of that name is left as it was."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:    # torch's zip writer reports a failed write as RuntimeError
        _remove(tmp)
        if isinstance(exc, RuntimeError) and "writ" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise UserError(f"could not write {path}: {reason}") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp):
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: no such file: {path}")
    try:
        # weights_only: tensors, numbers, strings, lists and dicts only. A file that needs anything more
        # could run code when unpickled; it is refused, never unpickled.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():   # a class or function it would have to import
            raise UserError(f"checkpoint: {path} holds Python objects beyond tensors, numbers, strings, lists and "
                            f"dicts; refused without unpickling it (mcncl_fast checkpoints never need more)") from None
        raise UserError(f"checkpoint: {path} is not a readable mcncl_fast checkpoint (UnpicklingError)") from None
    except Exception as exc:  # truncated / not a torch file
        raise UserError(f"checkpoint: {path} is not a readable mcncl_fast checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "mcncl_fast" or "model" not in state:
        raise UserError(f"checkpoint: {path} is not an mcncl_fast checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint: {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state
