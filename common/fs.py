"""Durable, atomic file writes and process liveness, shared by every room: the one writer
that leaves a reader either the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename or a new name is only durable after this)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every regular file and folder under `folder`, the folder itself last."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_writer(
    path: Path, *, binary: bool = False, mode: int | None = None
) -> Iterator[IO[Any]]:
    """Open a temp file beside `path` for writing; on a clean exit it is fsynced and renamed
    over `path`, so a reader sees either the old file or the whole new one. On an exception
    the temp file is removed and `path` is untouched. `mode` sets the new file's permissions
    (e.g. 0o600 for a secret); by default the umask decides, as for open()."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` atomically (see atomic_writer)."""
    with atomic_writer(path, binary=True, mode=mode) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def pid_alive(pid: int, command: str | None = None) -> bool:
    """Is `pid` a live process (and, given `command`, one whose command line contains it)?
    Checking the command line where /proc exists keeps a recycled pid from passing for the
    process that wrote it. A pid owned by another user counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if command is None or not cmdline.exists():
        return True
    try:
        return command in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False
