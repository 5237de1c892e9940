"""Lock files: an flock on a file, taken by every process that must not overlap another
(the daemon on its home, a training run, a change to the adapter registry).

The kernel drops an flock when its descriptor closes or its process dies (kill -9 included),
so a lock never outlives its holder and a stale file never blocks the next one. A holder may
write a line into the file (its pid) for the process it keeps out to name.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockBusy(RuntimeError):
    """Another process holds the lock; `note` is what it wrote into the file ("" if none)."""

    def __init__(self, path: Path, note: str) -> None:
        super().__init__(f"{path} is held by another process" + (f" ({note})" if note else ""))
        self.path = path
        self.note = note


def take(path: Path, *, wait: bool = True, note: str | None = None) -> int:
    """An exclusive flock on `path` (created if missing); returns the open descriptor that
    holds it: closing it frees the lock. With ``wait=False`` a lock another process holds
    raises LockBusy at once. `note` replaces the file's text once the lock is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held_by = _read(fd)
        os.close(fd)
        raise LockBusy(Path(path), held_by) from None
    except BaseException:
        os.close(fd)
        raise
    if note is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
    return fd


def release(fd: int, *, clear: bool = False) -> None:
    """Free a lock `take` returned; `clear` empties the file first (its note is stale)."""
    try:
        if clear:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def holder_note(path: Path) -> str | None:
    """What the process holding an exclusive lock on `path` wrote there (stripped), or None
    when no process holds one (or there is no file)."""
    if not Path(path).exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            # A shared lock is refused only while another's exclusive one is held.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
