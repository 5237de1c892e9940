"""The home folder: every piece of whetstone state lives under one path.

config.toml  whetstone.db  experiments.db  recipe.json  token  candidates/  models/  logs/  run/
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.fs import atomic_write_text


def default_home() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "whetstone"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def db_file(self) -> Path:
        return self.root / "whetstone.db"

    @property
    def experiments_db_file(self) -> Path:
        """Optuna's study storage for the recipe search (its own file: see
        orchestrator.experiments for why not whetstone.db)."""
        return self.root / "experiments.db"

    @property
    def recipe_file(self) -> Path:
        """The training recipe the search adopted, with its history."""
        return self.root / "recipe.json"

    @property
    def token_file(self) -> Path:
        return self.root / "token"

    @property
    def reasoning_key_file(self) -> Path:
        """The key that signs the reasoning the Responses API hands out as encrypted_content
        (production.api.reasoning_token), so a later request can prove it came from here."""
        return self.root / "reasoning.key"

    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def compile_cache_dir(self) -> Path:
        """torch.compile's and Triton's caches of the API worker: a restart (a crash, a reboot,
        systemd's private /tmp) finds its compiled decode step here instead of compiling it."""
        return self.root / "cache" / "compile"

    @property
    def server_file(self) -> Path:
        """Where a running API worker records its address, so the CLI and TUI find it."""
        return self.run_dir / "server.json"

    def server_record(self) -> dict[str, Any] | None:
        """What the API worker recorded in server_file (url, host, port, pid, started_at),
        or None when there is none or it cannot be read (a worker writes it atomically)."""
        try:
            record = json.loads(self.server_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def server_pid(self) -> int | None:
        """The pid the API worker recorded in server_file, or None without a usable one."""
        pid = (self.server_record() or {}).get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None

    def create(self) -> Home:
        for folder in (
            self.root,
            self.candidates_dir,
            self.models_dir,
            self.logs_dir,
            self.run_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def read_token(self) -> str | None:
        if not self.token_file.exists():
            return None
        mode = self.token_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{self.token_file} is readable by others (mode {mode:o}); run: chmod 600 "
                f"{self.token_file}"
            )
        return self.token_file.read_text().strip() or None

    def ensure_reasoning_key(self) -> bytes:
        """Return the home's reasoning-signing key, creating a random one (mode 0600) if
        absent. Kept across restarts: a token handed out yesterday still verifies today."""
        path = self.reasoning_key_file
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise PermissionError(
                    f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
                )
            try:
                key = bytes.fromhex(path.read_text().strip())
            except ValueError:
                key = b""
            if len(key) >= 32:
                return key
            raise ValueError(
                f"{path} holds no key of 32 bytes (hex); delete it to make a new one (the "
                "reasoning items handed out with the old key can then not be sent back)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        # Temp then rename (atomic_write_text): a reader never sees half a key.
        atomic_write_text(path, key.hex() + "\n", mode=0o600)
        return key

    def ensure_token(self) -> str:
        """Return the home's bearer token, creating a random one (mode 0600) if absent."""
        existing = self.read_token()
        if existing:
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        atomic_write_text(self.token_file, token + "\n", mode=0o600)
        return token
