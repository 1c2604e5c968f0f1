"""Checkpoints: written atomically (a temp file in the same folder, then os.replace), checked when read."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ._files import atomic_path
from .data.errors import UserError

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically (mcncl_fast._files). A full disk or a folder that became unwritable is a
    one-line error; the previous file of that name is left as it was."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:      # torch's zip writer reports a failed write as RuntimeError
            if "writ" not in str(exc).lower():
                raise
            raise OSError(str(exc).splitlines()[0]) from None


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: no such file: {path}")
    _check_archive(path)
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


def _check_archive(path: Path) -> None:
    """torch.load does not verify the zip's CRCs: a flipped byte in a tensor loads as a silently wrong weight."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return      # not a zip at all: torch.load says it is unreadable
    except (OSError, EOFError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint: {path} is corrupt ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise UserError(f"checkpoint: {path} is corrupt: {bad} fails its CRC check (the file was damaged after "
                        f"it was written); use another checkpoint (e.g. best.pt / last.pt)")
