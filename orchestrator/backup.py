"""`whetstone backup` and `whetstone restore`: a consistent copy of a home while its daemon
runs, and putting one back without ever leaving half of it.

A backup is a folder laid out like the part of a home it holds:

    manifest.json         what is here: every file's size and sha256, the store's schema
                          revision, whetstone's version, the time, the base model, the champions
    whetstone.db          the store, copied with SQLite's online backup API
    experiments.db        the recipe search's study, the same way (when the home has one)
    config.toml           recipe.json   (when the home has them)
    candidates/<id>/      the `current` and `previous` adapters, their links and the history

Not in it: models/ (prepared base models: large, `whetstone doctor` makes them again),
cache/ (compiled kernels, made again at the next start), logs/, run/, exports/, reports/,
backups/, the other candidates, and the API token (a secret; `whetstone token` makes a new
one).

Both directions build in a temp folder beside the destination and rename it into place:
a reader, or a kill -9, finds the old state or the new one. A killed run's temp folder
carries its pid, and the next run beside it removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.request import pathname2url

from sqlalchemy.engine import make_url

from candidates.registry import CURRENT, HISTORY_FILE, ID_PATTERN, PREVIOUS, RESERVED_IDS, Registry
from common.config import Settings
from common.fs import atomic_write_text, fsync_dir, fsync_tree, pid_alive
from common.home import Home
from common.run_state import HomeBusy, HomeLock, daemon_pid
from data import db
from data.errors import SchemaTooNewError
from data.store import Store
from orchestrator.jobs import TRAIN_MODULE

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KIND = "whetstone-backup"
# Bumped when a backup's layout changes in a way an older restore would misread.
FORMAT = 1

_NAMES = Home(Path())
DB = _NAMES.db_file.name
EXPERIMENTS_DB = _NAMES.experiments_db_file.name
CONFIG = _NAMES.config_file.name
RECIPE = _NAMES.recipe_file.name
CANDIDATES = _NAMES.candidates_dir.name
# What a backup may hold at its top; a manifest naming anything else is refused, so an
# edited manifest cannot make a restore write a token or a run/ file into the home.
TOP_FILES = frozenset({DB, EXPERIMENTS_DB, CONFIG, RECIPE})
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
# A home's own machine-local things, not in a backup: a restore over an existing home
# keeps them (the prepared base model took minutes to make).
# The reasoning key is a secret as the token is (it signs the Responses API's
# encrypted_content): kept with the home, never copied.
CARRIED = (
    "models",
    "logs",
    "token",
    _NAMES.reasoning_key_file.name,
    "exports",
    "reports",
    "backups",
)
# What a fresh home holds before it has data (`whetstone doctor` makes these).
FRESH = frozenset(
    {
        DB,
        *(DB + side for side in SQLITE_SIDE_FILES),
        CANDIDATES,
        "run",
        *CARRIED,
    }
)

_CHUNK = 1 << 20
_BUSY_TIMEOUT_S = 30.0
_WORK_NAME = re.compile(
    r"^\.(?P<name>.+)\.whetstone-(?P<kind>tmp|old|restore)-(?P<pid>\d+)-[0-9a-f]{8}$"
)


class BackupError(Exception):
    """A backup that could not be written; the message says why. No earlier backup changed."""


class RestoreRefused(Exception):
    """A restore refused before the home changed; the message names the problem."""


class BackupDamaged(RestoreRefused):
    """The backup is not whole: its manifest or a file is missing, truncated or altered."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(entry["size"] for entry in self.manifest["files"])


@dataclass(frozen=True)
class RestoreResult:
    home: Path
    manifest: dict[str, Any]
    schema_revision: str | None  # the restored store's, after any migration
    moved_aside: Path | None  # where the home's earlier files went, if it had any
    carried: list[str]  # this machine's things kept from the earlier home (models, logs...)


# --- shared --------------------------------------------------------------------------------


def whetstone_version() -> str:
    try:
        return importlib.metadata.version("whetstone")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_backup_dir(settings: Settings) -> Path:
    """<home>/backups/<UTC time>: beside the data it copies, so copy it to another disk too."""
    return settings.paths.root / "backups" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL; None for another database or an in-memory one."""
    sa_url = make_url(url)
    database = sa_url.database or ""
    if sa_url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _work_name(name: str, kind: str) -> str:
    # The pid lets the next run tell a killed run's leftovers from live work.
    return f".{name}.whetstone-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def prune_stale(folder: Path) -> list[str]:
    """Remove the temp folders that killed backups and restores left in `folder`.

    An earlier backup set aside while a new one took its place (`old`) is removed only once
    the new one is there; otherwise it may be the last copy, and it is kept (logged).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        found = _WORK_NAME.match(entry.name)
        if found is None or pid_alive(int(found["pid"])):
            continue
        path = Path(entry.path)
        if found["kind"] == "old" and not (folder / found["name"] / MANIFEST).is_file():
            log.warning("kept %s: an interrupted backup set it aside and nothing replaced it", path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.info("removed what interrupted backups or restores left in %s: %s", folder, removed)
    return removed


@contextlib.contextmanager
def _sqlite(
    path: Path, *, read_only: bool = False, immutable: bool = False
) -> Iterator[sqlite3.Connection]:
    # read_only: checking a backup in place must not change a byte of it.
    if immutable:
        connection = sqlite3.connect(f"file:{pathname2url(str(path))}?immutable=1", uri=True)
    elif read_only:
        connection = sqlite3.connect(f"file:{pathname2url(str(path))}?mode=ro", uri=True)
    else:
        connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
    try:
        yield connection
    finally:
        connection.close()


@dataclass(frozen=True)
class _DatabaseFacts:
    problems: list[str]  # PRAGMA integrity_check's findings; empty when it says ok
    revision: str | None
    conversations: int


def _database_facts(path: Path, *, read_only: bool = False) -> _DatabaseFacts:
    """integrity_check, the Alembic revision and the conversations kept (not forgotten)."""
    with _sqlite(path, read_only=read_only) as connection:
        rows = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        try:
            versions = [
                row[0] for row in connection.execute("SELECT version_num FROM alembic_version")
            ]
        except sqlite3.OperationalError:  # never migrated
            versions = []
        try:
            (conversations,) = connection.execute(
                "SELECT count(*) FROM conversations WHERE forgotten_at IS NULL"
            ).fetchone()
        except sqlite3.OperationalError:
            conversations = 0
    return _DatabaseFacts(
        problems=[] if rows == ["ok"] else rows,
        revision=",".join(versions) or None,
        conversations=conversations,
    )


def _integrity(path: Path, rel: str, *, read_only: bool) -> _DatabaseFacts:
    try:
        facts = _database_facts(path, read_only=read_only)
    except sqlite3.DatabaseError as exc:
        raise BackupDamaged(f"{rel} is damaged: SQLite cannot read it ({exc})") from None
    if facts.problems:
        shown = "; ".join(facts.problems[:5])
        more = f" (and {len(facts.problems) - 5} more)" if len(facts.problems) > 5 else ""
        raise BackupDamaged(f"{rel} fails PRAGMA integrity_check: {shown}{more}")
    return facts


# --- backup --------------------------------------------------------------------------------


def _copy_sqlite(source: Path, target: Path) -> None:
    try:
        _online_backup(source, target)
    except sqlite3.OperationalError:
        if not _read_only_file_system(source.parent):
            raise
        # A home on a read-only mount (a failing disk mounted ro to rescue it): SQLite cannot
        # make the -shm file a WAL reader needs there. Nothing can write that mount, so an
        # immutable open reads the database exactly, unless a WAL still holds commits.
        wal = source.with_name(source.name + "-wal")
        if wal.is_file() and wal.stat().st_size:
            raise BackupError(
                f"{source} is on a read-only file system and its {wal.name} holds writes not "
                "yet merged, which SQLite cannot read there: copy the home to a writable "
                "disk and back up that copy"
            ) from None
        target.unlink(missing_ok=True)
        _online_backup(source, target, immutable=True)


def _online_backup(source: Path, target: Path, *, immutable: bool = False) -> None:
    with _sqlite(source, immutable=immutable) as src, _sqlite(target) as dst:
        # One step (pages=-1): the copy reads one snapshot in one read transaction, which WAL
        # lets writers go on beside. Copied in chunks, the backup starts over whenever another
        # process commits, and a busy home might never finish.
        src.backup(dst)
        # A self-contained file: no -wal beside it to be lost on the way to another disk.
        dst.execute("PRAGMA journal_mode=DELETE")


def _read_only_file_system(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _file_entries(root: Path) -> list[dict[str, Any]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink():  # current/previous: recorded by id in the manifest
                continue
            entries.append(
                {
                    "path": path.relative_to(root).as_posix(),
                    "size": path.stat().st_size,
                    "sha256": _sha256(path),
                }
            )
    return entries


def _check_destination(dest: Path, home: Path) -> None:
    if dest == home or home.is_relative_to(dest):
        raise BackupError(f"{dest} holds the home {home}; write the backup somewhere else")
    if not os.path.lexists(dest):
        return
    if dest.is_symlink() or not dest.is_dir():
        raise BackupError(f"{dest} exists and is not a folder; name a new folder for the backup")
    if (dest / MANIFEST).is_file() or not any(dest.iterdir()):
        return  # an earlier backup (or an empty folder): replaced once the new one is whole
    raise BackupError(
        f"{dest} exists and is not a whetstone backup (no {MANIFEST}); name a new folder, "
        "or an earlier backup to replace"
    )


def _write_backup(settings: Settings, db_file: Path, tmp: Path) -> dict[str, Any]:
    paths = settings.paths
    # The store first, then the adapters under the registry's lock: the lock is held only
    # for the folder copies, so promotions wait for seconds, not for the whole database.
    _copy_sqlite(db_file, tmp / DB)
    facts = _database_facts(tmp / DB)
    if facts.problems:
        raise BackupError(
            f"the copy of {db_file} fails PRAGMA integrity_check "
            f"({'; '.join(facts.problems[:5])}); the home's database may be damaged: check it "
            f"with `sqlite3 {db_file} 'PRAGMA integrity_check'`"
        )
    if paths.experiments_db_file.is_file():
        _copy_sqlite(paths.experiments_db_file, tmp / EXPERIMENTS_DB)
    for source in (paths.config_file, paths.recipe_file):
        if source.is_file():
            shutil.copy2(source, tmp / source.name)
    current = previous = None
    if paths.candidates_dir.is_dir():
        registry = Registry(paths.candidates_dir, prune=False)
        current, previous = registry.copy_champions(tmp / CANDIDATES)
    return {
        "kind": KIND,
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "whetstone_version": whetstone_version(),
        "home": str(paths.root),
        "base_model": settings.model.base_model,
        "schema_revision": facts.revision,
        "conversations": facts.conversations,
        "current": current,
        "previous": previous,
        "files": _file_entries(tmp),
    }


def _rename_over(new: Path, target: Path, aside: Path) -> bool:
    """Rename the folder `new` to `target`. An existing `target` is renamed to `aside` first
    (rename(2) cannot replace a folder that has files) and put back if the second rename
    fails; killed between the two, it stays under `aside`. True when something was set aside."""
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_dir(target.parent)
        return False
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_dir(target.parent)
    return True


def _put_in_place(tmp: Path, dest: Path) -> None:
    old = dest.parent / _work_name(dest.name, "old")
    if _rename_over(tmp, dest, old):
        shutil.rmtree(old, ignore_errors=True)


def create_backup(settings: Settings, dest: Path | None = None) -> BackupResult:
    """Write a consistent copy of the home into `dest` (default: default_backup_dir).

    Safe while the daemon, a chat and a training job write. An earlier backup at `dest` is
    replaced only once the new one is complete; raises BackupError (nothing replaced).
    """
    root = settings.paths.root
    if not root.is_dir():
        raise BackupError(f"no whetstone home at {root}: check --home / WHETSTONE_HOME")
    db_file = sqlite_file(settings.db_url)
    if db_file is None:
        shown = make_url(settings.db_url).render_as_string(hide_password=True)
        raise BackupError(
            f"the store is not a SQLite file (database_url = {shown}); `whetstone backup` "
            "copies SQLite: back that database up with its own tools (pg_dump for PostgreSQL)"
        )
    if not db_file.is_file():
        raise BackupError(f"{root} has no database yet ({db_file}): nothing to back up")
    dest = Path(os.path.abspath((dest or default_backup_dir(settings)).expanduser()))
    _check_destination(dest, root.resolve())
    dest.parent.mkdir(parents=True, exist_ok=True)
    prune_stale(dest.parent)
    tmp = dest.parent / _work_name(dest.name, "tmp")
    tmp.mkdir()
    try:
        try:
            manifest = _write_backup(settings, db_file, tmp)
        except sqlite3.Error as exc:
            raise BackupError(f"cannot copy the database {db_file}: {exc}") from None
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)
        _put_in_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "backup of %s written to %s (%d files, schema %s)",
        root,
        dest,
        len(manifest["files"]),
        manifest["schema_revision"],
    )
    return BackupResult(path=dest, manifest=manifest)


# --- reading a backup ----------------------------------------------------------------------


def _check_member(rel: Any) -> str:
    if not isinstance(rel, str) or not rel:
        raise BackupDamaged(f"{MANIFEST} is damaged: a file entry has no path")
    parts = PurePosixPath(rel).parts
    safe = (
        not rel.startswith("/")
        and PurePosixPath(rel).as_posix() == rel
        and not any(part in (".", "..") for part in parts)
    )
    if safe and len(parts) == 1 and parts[0] in TOP_FILES:
        return rel
    if safe and parts[0] == CANDIDATES:
        if parts[1:] == (HISTORY_FILE,):
            return rel
        if len(parts) >= 3 and _is_candidate_id(parts[1]):
            return rel
    raise BackupDamaged(f"{MANIFEST} lists {rel!r}, which a whetstone backup never holds")


def _is_candidate_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and ID_PATTERN.fullmatch(value) is not None
        and value.lower() not in RESERVED_IDS
        and ".." not in value
    )


def read_manifest(source: Path) -> dict[str, Any]:
    """The backup's manifest, its shape checked; BackupDamaged or RestoreRefused says why not."""
    if not source.is_dir():
        raise RestoreRefused(f"{source} is not a folder: name a backup folder")
    path = source / MANIFEST
    if not path.is_file():
        raise BackupDamaged(f"{source} is not a whetstone backup: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupDamaged(f"{path} is damaged: it is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BackupDamaged(f"{path} is not a whetstone backup manifest")
    found = manifest.get("format")
    if isinstance(found, bool) or not isinstance(found, int):
        raise BackupDamaged(f"{path} is damaged: format is {found!r}")
    if found > FORMAT:
        raise RestoreRefused(
            f"{source} is a backup of format {found}, written by whetstone "
            f"{manifest.get('whetstone_version', '?')}; this whetstone ({whetstone_version()}) "
            f"reads format {FORMAT}: upgrade whetstone to restore it"
        )
    files = manifest.get("files")
    if not isinstance(files, list):
        raise BackupDamaged(f"{path} is damaged: it has no file list")
    for entry in files:
        if not isinstance(entry, dict):
            raise BackupDamaged(f"{path} is damaged: a file entry is not an object")
        rel = _check_member(entry.get("path"))
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BackupDamaged(f"{path} is damaged: {rel} has size {size!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BackupDamaged(f"{path} is damaged: {rel} has sha256 {digest!r}")
    listed = {entry["path"] for entry in files}
    if DB not in listed:
        raise BackupDamaged(f"{path} is damaged: it lists no {DB}")
    for name in (CURRENT, PREVIOUS):
        candidate_id = manifest.get(name)
        if candidate_id is None:
            continue
        if not _is_candidate_id(candidate_id):
            raise BackupDamaged(f"{path} is damaged: {name} is {candidate_id!r}, not an id")
        if not any(rel.startswith(f"{CANDIDATES}/{candidate_id}/") for rel in listed):
            raise BackupDamaged(
                f"{path} names {candidate_id} as {name}, but lists no file of "
                f"{CANDIDATES}/{candidate_id}/"
            )
    return manifest


def _check_schema(source: Path, manifest: dict[str, Any]) -> None:
    revision = manifest.get("schema_revision")
    if revision is None:
        return  # a store never migrated: the restore migrates it like any new one
    if not isinstance(revision, str):
        raise BackupDamaged(f"{source / MANIFEST} is damaged: schema_revision is {revision!r}")
    known = db.known_revisions()
    unknown = [rev for rev in revision.split(",") if rev not in known]
    if unknown:
        raise RestoreRefused(
            f"{source} holds a database at schema revision {revision}, which this whetstone "
            f"({whetstone_version()}) does not know: it reads revisions up to {known[-1]}. "
            f"Whetstone {manifest.get('whetstone_version', '?')} wrote it: upgrade whetstone "
            "to restore it"
        )


def _verify_file(source: Path, entry: dict[str, Any], target: Path | None = None) -> None:
    """Check one listed file's size and sha256, copying it to `target` on the way."""
    rel, size, want = entry["path"], entry["size"], entry["sha256"]
    path = source / rel
    if path.is_symlink() or not path.is_file():
        raise BackupDamaged(f"{rel} is missing from the backup {source}")
    actual = path.stat().st_size
    if actual != size:
        kind = "truncated" if actual < size else "longer than it was written"
        raise BackupDamaged(
            f"{rel} is {actual} bytes, the manifest says {size}: the file is {kind}"
        )
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open(path, "rb"))
        # Hashed on the way in: what is staged is exactly what was checked.
        dst = stack.enter_context(open(target, "wb")) if target is not None else None
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            if dst is not None:
                dst.write(chunk)
    if digest.hexdigest() != want:
        raise BackupDamaged(
            f"{rel} failed its checksum (sha256 {digest.hexdigest()[:16]}..., the manifest "
            f"says {want[:16]}...): the file was altered or damaged since the backup"
        )
    if target is not None:
        shutil.copystat(path, target)


def verify_backup(source: Path) -> dict[str, Any]:
    """Check a backup in place, changing nothing: the manifest, every file's size and
    checksum, the schema revision, PRAGMA integrity_check. Returns the manifest."""
    source = Path(os.path.abspath(Path(source).expanduser()))
    manifest = read_manifest(source)
    _check_schema(source, manifest)
    for entry in manifest["files"]:
        _verify_file(source, entry)
    for name in (DB, EXPERIMENTS_DB):
        if any(entry["path"] == name for entry in manifest["files"]):
            _integrity(source / name, name, read_only=True)
    return manifest


# --- restore -------------------------------------------------------------------------------


def home_data(home: Path) -> list[str]:
    """What in `home` a restore would replace or not know: empty for a fresh home (one
    `whetstone doctor` made, with no conversation, run or adapter yet)."""
    found = []
    try:
        names = sorted(os.listdir(home))
    except FileNotFoundError:
        return found
    db_file = home / DB
    if db_file.is_file():
        rows = _store_rows(db_file)
        if rows:
            found.append(f"{DB} ({rows})")
    candidates = home / CANDIDATES
    if candidates.is_dir():
        adapters = [n for n in os.listdir(candidates) if not n.startswith(".")]
        history = candidates / HISTORY_FILE
        if adapters or (history.is_file() and history.stat().st_size):
            found.append(f"{CANDIDATES}/ ({len(adapters)} entries)")
    found += [name for name in names if name not in FRESH]
    return found


def _store_rows(db_file: Path) -> str | None:
    """'3 conversations, 1 training run...' for a store with rows; None for an empty one."""
    counted = []
    try:
        with _sqlite(db_file, read_only=True) as connection:
            for table, label in (
                ("conversations", "conversation(s)"),
                ("training_runs", "training run(s)"),
                ("candidates", "candidate record(s)"),
                ("promotions", "promotion(s)"),
            ):
                try:
                    (count,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
                except sqlite3.OperationalError:  # an older or empty schema
                    continue
                if count:
                    counted.append(f"{count} {label}")
    except sqlite3.DatabaseError as exc:
        return f"unreadable: {exc}"  # not judged empty: it may be data
    return ", ".join(counted) or None


def _refuse_busy(settings: Settings) -> None:
    """The daemon, a lone `whetstone serve` or a training job write the home."""
    owner = daemon_pid(settings.paths.root)
    if owner is not None:
        raise RestoreRefused(
            f"{HomeBusy(settings.paths.root, owner)}; a restore replaces the home under it"
        )
    pid = settings.paths.server_pid()
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        raise RestoreRefused(
            f"an API worker (pid {pid}, `whetstone serve`) is running on {settings.paths.root}; "
            "stop it first: a restore replaces the files it writes"
        )
    db_file = settings.paths.db_file
    if not db_file.is_file():
        return
    try:
        with _sqlite(db_file, read_only=True) as connection:
            rows = connection.execute(
                "SELECT id, pid FROM training_runs WHERE status = 'running' AND pid IS NOT NULL"
            ).fetchall()
    except sqlite3.Error:
        return
    for run_id, run_pid in rows:
        if pid_alive(run_pid, TRAIN_MODULE):
            raise RestoreRefused(
                f"training run {run_id} (pid {run_pid}) is running on {settings.paths.root}; "
                "wait for it or stop it first: a restore replaces the files it writes"
            )


def _stage(source: Path, manifest: dict[str, Any], staged: Path) -> str | None:
    """Build the restored home in `staged`; return the store's schema revision after any
    migration. Every check that can refuse runs here, before the home is touched."""
    for entry in manifest["files"]:
        target = staged / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        _verify_file(source, entry, target)
    candidates = staged / CANDIDATES
    candidates.mkdir(exist_ok=True)
    for name in (CURRENT, PREVIOUS):
        candidate_id = manifest.get(name)
        if candidate_id is not None:
            os.symlink(candidate_id, candidates / name)
    _integrity(staged / DB, DB, read_only=False)
    if (staged / EXPERIMENTS_DB).is_file():
        _integrity(staged / EXPERIMENTS_DB, EXPERIMENTS_DB, read_only=False)
    try:
        # Opening the store migrates an older schema, as whenever whetstone opens a home.
        with Store(f"sqlite:///{staged / DB}") as store:
            return store.schema_revision
    except SchemaTooNewError as exc:
        raise RestoreRefused(f"{source / DB}: {exc}") from None


def _aside_path(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    aside = home.with_name(f"{home.name}.before-restore-{stamp}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = home.with_name(f"{home.name}.before-restore-{stamp}-{n}")
    return aside


def _swap(home: Path, staged: Path, *, keep_aside: bool) -> tuple[Path | None, list[str]]:
    """Rename the staged home into place; the earlier one goes aside, and this machine's
    own things (CARRIED) come back from it."""
    aside = _aside_path(home)
    if not _rename_over(staged, home, aside):
        return None, []
    carried = []
    for name in CARRIED:
        if not os.path.lexists(aside / name) or os.path.lexists(home / name):
            continue
        try:
            os.rename(aside / name, home / name)
        except OSError as exc:
            # The restore is done; what stays behind is still in the aside folder.
            log.warning("could not bring %s back from %s: %s", name, aside, exc)
            keep_aside = True
            continue
        carried.append(name)
    fsync_dir(home)
    if keep_aside:
        return aside, carried
    # Nothing of the person's was there (a fresh home): only empty folders and an empty store.
    shutil.rmtree(aside, ignore_errors=True)
    return None, carried


def restore_backup(settings: Settings, source: Path, *, force: bool = False) -> RestoreResult:
    """Restore the backup at `source` into the settings' home, all or nothing.

    Refused (RestoreRefused, the home unchanged) when the backup is damaged or from a newer
    schema, when a daemon, an API worker or a training job runs on the home, and when the
    home already holds data, unless `force`: then its files are moved aside, not deleted.
    """
    source = Path(os.path.abspath(Path(source).expanduser()))
    manifest = read_manifest(source)
    _check_schema(source, manifest)
    home = settings.paths.root.resolve()
    db_file = sqlite_file(settings.db_url)
    if db_file is None or db_file.resolve() != (home / DB).resolve():
        raise RestoreRefused(
            f"this home's store is not {home / DB} (database_url is set): a restore writes "
            "the home's own SQLite file; restore into a home without database_url"
        )
    if os.path.lexists(home) and not home.is_dir():
        raise RestoreRefused(f"{home} exists and is not a folder")
    # The refusals first, while nothing has been written anywhere.
    _refuse_busy(settings)
    found = home_data(home)
    if found and not force:
        raise RestoreRefused(
            f"{home} already holds data: {', '.join(found)}. Pass --force to move it "
            f"aside (to {home.name}.before-restore-<time> beside it) and restore, or "
            "restore into another --home"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    lock = None
    if home.is_dir():
        # Held until the swap: a daemon started meanwhile would write into a home that is
        # about to be set aside.
        lock = HomeLock(settings)
        try:
            lock.acquire()
        except HomeBusy as exc:
            raise RestoreRefused(f"{exc}; a restore replaces the home under it") from None
    try:
        prune_stale(home.parent)
        staged = home.parent / _work_name(home.name, "restore")
        staged.mkdir()
        try:
            revision = _stage(source, manifest, staged)
            fsync_tree(staged)
            aside, carried = _swap(home, staged, keep_aside=bool(found))
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    finally:
        if lock is not None:
            lock.release()
    log.info("restored %s into %s (earlier files: %s)", source, home, aside or "none")
    return RestoreResult(
        home=home,
        manifest=manifest,
        schema_revision=revision,
        moved_aside=aside,
        carried=carried,
    )
