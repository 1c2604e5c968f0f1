"""Atomic file writes: every file the library writes appears whole or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temp file name in `path`'s folder (`<name>.<random>.tmp`) to write; when the block ends
    without an error, the file is flushed to disk and renamed onto `path`. On any failure the temp file
    is removed and `path` keeps what it held; an OSError (full disk, unwritable folder) becomes a
    one-line UserError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600; outputs follow the process umask like open()
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        from .data.errors import UserError   # here: mcncl_fast.data itself writes through this module
        raise UserError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
