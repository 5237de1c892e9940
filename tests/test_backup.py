"""`whetstone backup` and `whetstone restore` on real homes: a real SQLite store written to
while the backup runs, real adapter folders and links, the CLI in subprocesses (a kill -9
is a real SIGKILL). No model, no torch: the adapters are small safetensors files written by
hand, which the registry's own validation accepts."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from candidates import CandidateMeta, Registry
from common.config import load_settings
from common.run_state import HomeLock
from data.db import MIGRATIONS_DIR, head_revision, make_engine, write_engine
from data.store import Store
from orchestrator.backup import (
    BackupDamaged,
    BackupError,
    create_backup,
    restore_backup,
    verify_backup,
)
from tests.conftest import REPO, run_cli

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
_clock = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def write_adapter(folder: Path, rank: int = 4) -> None:
    """A PEFT LoRA adapter without torch: a safetensors file (8-byte header length, JSON
    header, raw F32 data) and adapter_config.json. Random weights, so every adapter differs."""
    folder.mkdir(parents=True, exist_ok=True)
    a_bytes, b_bytes = rank * 16 * 4, 16 * rank * 4
    header = {
        f"{LORA_PREFIX}.lora_A.weight": {
            "dtype": "F32",
            "shape": [rank, 16],
            "data_offsets": [0, a_bytes],
        },
        f"{LORA_PREFIX}.lora_B.weight": {
            "dtype": "F32",
            "shape": [16, rank],
            "data_offsets": [a_bytes, a_bytes + b_bytes],
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + os.urandom(a_bytes + b_bytes)
    (folder / "adapter_model.safetensors").write_bytes(data)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "base_model_name_or_path": BASE,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def add_candidate(registry: Registry, candidate_id: str) -> str:
    global _clock
    _clock += timedelta(minutes=1)
    registry.create(
        CandidateMeta(id=candidate_id, base_model=BASE, created_at=_clock), write_adapter
    )
    (registry.path(candidate_id) / "report.md").write_text(f"# {candidate_id}\n")
    return candidate_id


def chat(store: Store, n: int, text: str = "question") -> list[str]:
    """n conversations of a question, an answer and a rating; returns their ids."""
    ids = []
    for i in range(n):
        conversation = store.create_conversation(title=f"{text} {i}")
        store.add_message(conversation.id, "user", f"{text} {i}?")
        answer = store.add_message(
            conversation.id, "assistant", f"answer {i}", finish_reason="stop"
        )
        store.add_feedback(answer.id, rating=1 + i % 5)
        ids.append(conversation.id)
    return ids


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A home with a config, 5 rated conversations and a champion (b) with a previous (a)."""
    home = tmp_path / "source"
    home.mkdir()
    (home / "config.toml").write_text("[schedule]\nevery_n_feedback = 7\n")
    with Store(f"sqlite:///{home / 'whetstone.db'}") as store:
        chat(store, 5)
    registry = Registry(home / "candidates")
    for candidate_id in ("cand-a", "cand-b"):
        registry.promote(add_candidate(registry, candidate_id), base_model=BASE)
    return home


def integrity(db_file: Path) -> list[str]:
    connection = sqlite3.connect(db_file)
    try:
        return [row[0] for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()


def kept_conversations(home: Path) -> set[str]:
    connection = sqlite3.connect(home / "whetstone.db")
    try:
        return {
            row[0]
            for row in connection.execute("SELECT id FROM conversations WHERE forgotten_at IS NULL")
        }
    finally:
        connection.close()


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".whetstone-" in p.name)


def backup(home: Path, dest: Path) -> Path:
    """A backup written by this process (the library), for tests about restoring."""
    return create_backup(load_settings(home), dest).path


# --- a backup while the home is busy, restored into a fresh home ---------------------------


def test_a_backup_taken_while_chat_and_training_write_restores_every_conversation(
    source: Path, tmp_path: Path
) -> None:
    stop = threading.Event()
    committed: list[str] = []  # conversation ids, in commit order
    pairs = [("cand-b", "cand-a")]  # every (current, previous) the registry went through
    errors: list[BaseException] = []

    def chatting() -> None:
        with Store(f"sqlite:///{source / 'whetstone.db'}") as store:
            while not stop.is_set():
                committed.extend(chat(store, 1, "busy"))

    def training() -> None:
        registry = Registry(source / "candidates")
        with Store(f"sqlite:///{source / 'whetstone.db'}") as store:
            n = 0
            while not stop.is_set():
                n += 1
                run = store.create_run("quick_test", "nightly")
                store.update_run(run.id, status="running", progress={"step": 1})
                candidate_id = add_candidate(registry, f"cand-t{n}")
                result = registry.promote(candidate_id, base_model=BASE)
                pairs.append((result.new_current, result.previous))
                store.update_run(run.id, status="succeeded", candidate_id=candidate_id)

    def guarded(target):
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)

        return threading.Thread(target=run)

    threads = [guarded(chatting), guarded(training)]
    for thread in threads:
        thread.start()
    try:
        while len(committed) < 3 or len(pairs) < 2:
            assert not errors, errors
            time.sleep(0.05)
        before = list(committed)
        dest = tmp_path / "backup"
        made = run_cli("backup", str(dest), "--home", str(source))
        written_during = len(committed) - len(before)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert made.returncode == 0, made.stderr
    assert written_during > 0, "nothing was written while the backup ran"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert f"backup written to {dest}" in made.stdout
    assert f"{manifest['conversations']} conversation(s)" in made.stdout
    assert f"current {manifest['current']}" in made.stdout

    fresh = tmp_path / "fresh"
    restored = run_cli("restore", str(dest), "--home", str(fresh))
    assert restored.returncode == 0, restored.stderr
    assert f"restored {dest} into {fresh}" in restored.stdout

    kept = kept_conversations(fresh)
    # Everything committed before the backup began is there, and nothing invented.
    assert set(before) <= kept
    assert kept <= kept_conversations(source)
    assert len(kept) == manifest["conversations"]
    assert integrity(fresh / "whetstone.db") == ["ok"]
    with Store(f"sqlite:///{fresh / 'whetstone.db'}") as store:
        some = store.get_conversation(before[-1])
        assert [m.role for m in some.messages] == ["user", "assistant"]
        assert some.messages[1].current_feedback.rating is not None

    # The champions: a pair the registry really held (never torn by a promotion), each
    # folder byte for byte, and `current` pointing at the same id.
    current = os.readlink(fresh / "candidates" / "current")
    previous = os.readlink(fresh / "candidates" / "previous")
    assert (current, previous) == (manifest["current"], manifest["previous"])
    assert (current, previous) in pairs
    for candidate_id in (current, previous):
        assert files_of(fresh / "candidates" / candidate_id) == files_of(
            source / "candidates" / candidate_id
        )
    assert Registry(fresh / "candidates").validate(current, base_model=BASE).id == current
    assert (fresh / "config.toml").read_bytes() == (source / "config.toml").read_bytes()
    # Only the two champions travel; the other trained candidates stay behind.
    restored_ids = {c.id for c in Registry(fresh / "candidates").list()}
    assert restored_ids == {current, previous}
    assert leftovers(tmp_path) == []


# --- damaged backups -----------------------------------------------------------------------


def test_a_tampered_truncated_or_missing_file_is_refused_by_name(
    source: Path, tmp_path: Path
) -> None:
    good = backup(source, tmp_path / "good")
    assert verify_backup(good)["current"] == "cand-b"
    fresh = tmp_path / "fresh"

    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered, symlinks=True)
    weights = tampered / "candidates" / "cand-b" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight: the file still parses
    weights.write_bytes(bytes(data))
    refused = run_cli("restore", str(tampered), "--home", str(fresh))
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert "candidates/cand-b/adapter_model.safetensors failed its checksum" in message, message
    assert not fresh.exists()

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated, symlinks=True)
    db_file = truncated / "whetstone.db"
    size = db_file.stat().st_size
    os.truncate(db_file, size // 2)
    with pytest.raises(BackupDamaged, match=f"whetstone.db is {size // 2} bytes.*truncated"):
        restore_backup(load_settings(fresh), truncated)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing, symlinks=True)
    (missing / "config.toml").unlink()
    with pytest.raises(BackupDamaged, match="config.toml is missing"):
        verify_backup(missing)

    nothing = tmp_path / "no-manifest"
    shutil.copytree(good, nothing, symlinks=True)
    (nothing / "manifest.json").unlink()
    checked = run_cli("restore", str(nothing), "--check")
    assert checked.returncode == 1
    assert "is not a whetstone backup: manifest.json is missing" in " ".join(checked.stderr.split())

    # Each refusal changed nothing: no home, no half-built one beside it.
    assert not fresh.exists()
    assert leftovers(tmp_path) == []
    assert integrity(good / "whetstone.db") == ["ok"]


def test_a_database_that_fails_integrity_check_is_refused(tmp_path: Path) -> None:
    """Checksums that match a database damaged before it was hashed (a disk error under a
    copy whose manifest was remade): PRAGMA integrity_check still refuses it."""
    home = tmp_path / "source"
    with Store(f"sqlite:///{home / 'whetstone.db'}") as store:
        ids = chat(store, 5)
    damaged = backup(home, tmp_path / "damaged")
    db_file = damaged / "whetstone.db"
    connection = sqlite3.connect(db_file)
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    (root_page,) = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'conversations'"
    ).fetchone()
    connection.close()
    # One conversation id changed in the table's page only: its index no longer agrees.
    data = bytearray(db_file.read_bytes())
    start = (root_page - 1) * page_size
    at = start + data[start : start + page_size].find(ids[0].encode())
    data[at + len(ids[0]) - 1] ^= 0x01
    db_file.write_bytes(bytes(data))
    manifest = json.loads((damaged / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "whetstone.db":
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BackupDamaged, match="whetstone.db fails PRAGMA integrity_check: row"):
        restore_backup(load_settings(tmp_path / "fresh"), damaged)
    with pytest.raises(BackupDamaged, match="whetstone.db fails PRAGMA integrity_check"):
        verify_backup(damaged)
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path) == []


# --- schema revisions ----------------------------------------------------------------------


def test_a_backup_from_a_newer_schema_is_refused_naming_both_revisions(
    source: Path, tmp_path: Path
) -> None:
    connection = sqlite3.connect(source / "whetstone.db")
    with connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    connection.close()
    dest = tmp_path / "from-the-future"
    made = run_cli("backup", str(dest), "--home", str(source))
    assert made.returncode == 0, made.stderr  # a newer whetstone's home backs up fine
    fresh = tmp_path / "fresh"
    refused = run_cli("restore", str(dest), "--home", str(fresh))
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert "schema revision 0099" in message, message
    assert f"up to {head_revision()}" in message, message
    assert "upgrade whetstone" in message
    assert not fresh.exists()


def test_a_backup_from_an_older_schema_is_migrated_on_restore(tmp_path: Path) -> None:
    old_home = tmp_path / "old"
    engine = make_engine(f"sqlite:///{old_home / 'whetstone.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with write_engine(engine).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    engine.dispose()
    dest = backup(old_home, tmp_path / "backup")
    assert json.loads((dest / "manifest.json").read_text())["schema_revision"] == "0003"

    fresh = tmp_path / "fresh"
    restored = run_cli("restore", str(dest), "--home", str(fresh))
    assert restored.returncode == 0, restored.stderr
    assert f"schema 0003 -> {head_revision()} (migrated)" in restored.stdout
    with Store(f"sqlite:///{fresh / 'whetstone.db'}", migrate=False) as store:
        assert store.schema_revision == head_revision()
    # The backup itself is as it was written.
    assert verify_backup(dest)["schema_revision"] == "0003"


# --- kill -9 -------------------------------------------------------------------------------


@contextmanager
def registry_locked(home: Path) -> Iterator[None]:
    """Hold the registry's lock, as a promotion does: a backup waits for it to copy the
    adapters, after it copied the database."""
    fd = os.open(home / "candidates" / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_backup_killed_mid_copy_leaves_the_earlier_backup_and_the_next_one_succeeds(
    source: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "nightly"
    first = run_cli("backup", str(dest), "--home", str(source))
    assert first.returncode == 0, first.stderr
    earlier = files_of(dest)
    with Store(f"sqlite:///{source / 'whetstone.db'}") as store:
        chat(store, 3, "later")

    with registry_locked(source):
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "backup", str(dest), "--home", str(source)],
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        # Mid-copy: its temp folder holds the database, and it cannot finish without the lock.
        while not any((tmp_path / name / "whetstone.db").exists() for name in leftovers(tmp_path)):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the backup never started copying"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        process.stderr.close()

    assert files_of(dest) == earlier  # the earlier backup, byte for byte
    assert verify_backup(dest)["conversations"] == 5
    left = leftovers(tmp_path)
    assert len(left) == 1 and ".whetstone-tmp-" in left[0]

    second = run_cli("backup", str(dest), "--home", str(source))
    assert second.returncode == 0, second.stderr
    assert leftovers(tmp_path) == []  # the killed run's temp folder is gone
    assert verify_backup(dest)["conversations"] == 8


# --- where a restore must not go -----------------------------------------------------------


def test_restore_over_a_home_with_data_needs_force_and_moves_it_aside(
    source: Path, tmp_path: Path
) -> None:
    dest = backup(source, tmp_path / "backup")
    target = tmp_path / "target"
    with Store(f"sqlite:///{target / 'whetstone.db'}") as store:
        mine = chat(store, 1, "mine")
    (target / "models").mkdir()
    (target / "models" / "prepared.bin").write_bytes(b"a prepared base model")
    before = files_of(target)

    def unchanged() -> bool:
        # SQLite's own -shm/-wal beside a store it opened are not the person's data.
        now = files_of(target)
        return all(now.get(name) == data for name, data in before.items() if "-" not in name)

    refused = run_cli("restore", str(dest), "--home", str(target))
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert f"{target} already holds data: whetstone.db (1 conversation(s))" in message, message
    assert "--force" in message
    assert unchanged()

    forced = run_cli("restore", str(dest), "--home", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    out = " ".join(forced.stdout.split())
    asides = [p for p in tmp_path.iterdir() if p.name.startswith("target.before-restore-")]
    assert len(asides) == 1
    assert f"the home's earlier files were moved to {asides[0]}" in out, out
    assert kept_conversations(asides[0]) == set(mine)  # moved, not deleted
    assert kept_conversations(target) == kept_conversations(source)
    assert os.readlink(target / "candidates" / "current") == "cand-b"
    # This machine's prepared model stays with the home.
    assert (target / "models" / "prepared.bin").read_bytes() == b"a prepared base model"
    assert "kept from this machine: models" in out
    assert leftovers(tmp_path) == []


def test_restore_into_a_fresh_home_that_doctor_made_needs_no_force(
    source: Path, tmp_path: Path
) -> None:
    dest = backup(source, tmp_path / "backup")
    target = tmp_path / "target"
    with Store(f"sqlite:///{target / 'whetstone.db'}"):
        pass  # an empty, migrated store: what `whetstone doctor` leaves
    for folder in ("candidates", "models", "logs", "run"):
        (target / folder).mkdir(exist_ok=True)
    result = restore_backup(load_settings(target), dest)
    assert result.moved_aside is None
    assert kept_conversations(target) == kept_conversations(source)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("target.")] == []


def test_restore_is_refused_while_a_daemon_runs_on_the_home(source: Path, tmp_path: Path) -> None:
    dest = backup(source, tmp_path / "backup")
    target = tmp_path / "target"
    target.mkdir()
    lock = HomeLock(load_settings(target))
    lock.acquire()  # what `whetstone up` holds while it runs
    try:
        refused = run_cli("restore", str(dest), "--home", str(target), "--force")
    finally:
        lock.release()
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert f"another `whetstone up` (pid {os.getpid()}) is running on {target}" in message
    assert not (target / "whetstone.db").exists()


def test_a_backup_never_overwrites_a_folder_it_did_not_write(source: Path, tmp_path: Path) -> None:
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(BackupError, match="is not a whetstone backup"):
        backup(source, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
    with pytest.raises(BackupError, match="holds the home"):
        backup(source, tmp_path)
    assert leftovers(tmp_path) == []


def test_without_a_folder_the_backup_goes_under_the_home(source: Path) -> None:
    result = create_backup(load_settings(source))
    assert result.path.parent == source / "backups"
    assert verify_backup(result.path)["current"] == "cand-b"
    # A second one beside it, and a restore of the home with data still needs --force.
    assert create_backup(load_settings(source)).path.parent == source / "backups"


def test_a_home_on_a_read_only_mount_backs_up(source: Path, tmp_path: Path) -> None:
    """The rescue case: a failing disk mounted read-only. SQLite cannot make a WAL reader's
    -shm file there and the registry's lock cannot be created; neither is needed, since
    nothing can write that mount. Skipped where this user cannot mount a tmpfs."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        home = mount / "home"
        shutil.copytree(source, home, symlinks=True)
        (home / "candidates" / ".lock").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        dest = tmp_path / "rescued"
        made = run_cli("backup", str(dest), "--home", str(home))
        assert made.returncode == 0, made.stderr
        manifest = verify_backup(dest)
        assert (manifest["current"], manifest["conversations"]) == ("cand-b", 5)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
