"""What the daemon is doing, as every other process reads it: the home's lock
(run/daemon.lock, holding the daemon's pid) and its state file (run/daemon.json). The
daemon writes both; the CLI, the API worker, training jobs and the TUI's server only read,
so none of them imports the daemon."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

from common import locks
from common.config import Settings

LOCK_NAME = "daemon.lock"
STATE_NAME = "daemon.json"


class RunState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class HomeBusy(RuntimeError):
    """Another `whetstone up` holds this home."""

    def __init__(self, home: Path, owner: int | None) -> None:
        super().__init__(
            f"another `whetstone up` (pid {owner or '?'}) is running on {home}; stop it first "
            "(under systemd: systemctl --user stop whetstone) or pass another --home"
        )


# --- the home lock ---------------------------------------------------------------------------


def lock_file(settings: Settings) -> Path:
    return settings.paths.run_dir / LOCK_NAME


def state_file(settings: Settings) -> Path:
    return settings.paths.run_dir / STATE_NAME


class HomeLock:
    """An exclusive flock on run/daemon.lock, holding the owner's pid. The kernel drops it
    when the process dies (kill -9 included), so a stale lock never blocks a restart."""

    def __init__(self, settings: Settings) -> None:
        self.path = lock_file(settings)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = locks.take(self.path, wait=False, note=f"{os.getpid()}\n")
        except locks.LockBusy:
            home = self.path.parent.parent
            raise HomeBusy(home, daemon_pid(home)) from None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            locks.release(self._fd)
            self._fd = None


def daemon_pid(home: Path) -> int | None:
    """The pid of the daemon holding `home`, or None when no daemon runs there."""
    note = locks.holder_note(Path(home) / "run" / LOCK_NAME)
    if note is None:
        return None
    return int(note) if note.isdigit() else -1


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The daemon's run/daemon.json when a daemon holds the home; None otherwise."""
    if daemon_pid(settings.paths.root) is None:
        return None
    try:
        return json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return {"state": RunState.STARTING.value}
