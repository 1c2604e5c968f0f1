"""Outputs never replace inputs: a report or CSV is never written over a file the same command reads,
and never over a checkpoint."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable, Optional

from .data.errors import UserError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    # torch.save writes a zip archive; no report or CSV of ours is one
    return path.suffix == ".pt" or (path.is_file() and zipfile.is_zipfile(path))


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Optional[object]], option: str = "--output") -> None:
    """One-line UserError when an output is one of `inputs` (files or folders this command reads) or a
    checkpoint; call before anything is written."""
    inputs = [Path(p) for p in inputs if p is not None]
    for out in map(Path, outputs):
        for src in inputs:
            if _same_file(out, src) or (src.is_dir() and _same_file(out.parent, src) and out.suffix == ".safetensors"):
                raise UserError(f"{option} {out}: is an input of this command ({src}); choose another file")
        if _is_checkpoint(out):
            raise UserError(f"{option} {out}: is (or would be named like) a checkpoint; reports and predictions "
                            f"never replace a checkpoint - choose another file")
