"""The output folder of a training run: one run at a time, writable, no debris, no other run's files.

Before any data is loaded or any step is taken, `RunDirectory.open`:
* creates the folder (an existing file of that name is an error);
* takes a lock file (`.lock`, holding the process id): a second run into the same folder is refused
  while the first is alive; a lock left by a killed process is taken over;
* proves the folder writable by writing a probe file (a read-only folder fails now, not after an epoch);
* removes temp files left by a save that was killed half-way (`*.pt.*.tmp`, `*.json.*.tmp`, ...);
* refuses a fresh run into a folder that already holds a run's checkpoints, unless told to overwrite
  them: `--resume <folder>/last.pt` continues that run instead.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

from .data.errors import UserError

LOCK_NAME = ".lock"
RUN_FILES = ("last.pt", "best.pt")
DEBRIS_PATTERNS = ("*.pt.*.tmp", "*.json.*.tmp", "*.md.*.tmp", ".probe.*")   # _files.atomic_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


class RunDirectory:
    def __init__(self, path):
        self.path = Path(path)
        self.lock = self.path / LOCK_NAME
        self.held = False

    def open(self, resuming: bool, overwrite: bool = False, run_id=None) -> "RunDirectory":
        """run_id: the resumed run's id; a folder holding checkpoints of another run is refused."""
        where = f"--output-dir {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{where}: exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{where}: cannot create the folder ({exc.strerror})") from None
        self._take_lock(where)
        try:
            self._probe(where)
            for pattern in DEBRIS_PATTERNS:
                for debris in self.path.glob(pattern):
                    debris.unlink(missing_ok=True)
            existing = [name for name in RUN_FILES if (self.path / name).exists()]
            if existing and not resuming and not overwrite:
                raise UserError(f"{where}: already holds a run ({', '.join(existing)}); continue it with "
                                f"--resume {self.path / 'last.pt'}, or choose another --output-dir (or --overwrite)")
            if existing and resuming and run_id is not None and not overwrite:
                self._refuse_other_run(where, existing, run_id)
        except BaseException:
            self.close()
            raise
        return self

    def _refuse_other_run(self, where, existing, run_id):
        from .checkpoints import load_checkpoint
        for name in existing:
            try:
                other = load_checkpoint(self.path / name).get("run_id")
            except UserError:
                other = "unreadable"
            if other != run_id:
                raise UserError(f"{where}: holds another run's checkpoint ({name}); a resumed run writes only into "
                                f"its own folder - choose another --output-dir (or --overwrite)")

    def _take_lock(self, where):
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(f"{where}: in use by another run (process {pid}); wait for it or choose "
                                    f"another --output-dir") from None
                self.lock.unlink(missing_ok=True)       # left by a process that is gone
                print(f"note: {where}: taking over the lock of a run that is no longer alive (process {pid})",
                      file=sys.stderr)
                continue
            except OSError as exc:
                raise UserError(f"{where}: not writable ({exc.strerror})") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise UserError(f"{where}: could not take the folder's lock file {self.lock}")

    def _probe(self, where):
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.path)
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            os.unlink(probe)
        except OSError as exc:
            kind = "full" if exc.errno == errno.ENOSPC else "not writable"
            raise UserError(f"{where}: {kind} ({exc.strerror})") from None

    def close(self) -> None:
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
