"""The adapter registry on disk: candidate folders, the `current` and `previous` symlinks.

Layout under the root (`<home>/candidates`):

    <id>/                       a complete candidate (PEFT adapter + meta.json + reports)
    current -> <id>             the champion; absent means the base model serves
    previous -> <id>            the champion before it, for rollback
    .lock                       flock taken by every change to the links or the folders
    .history.jsonl              one line per promote / rollback, for reports and audits
    .tmp-* / .trash-*           work in progress; never visible under an id

Readers never lock: every change they can observe is a single rename(2), so they see the
old state or the new one. Writers serialise on `.lock`.

One module on purpose: every change to the candidate tree follows the one lock-and-rename
discipline here; split up, the invariants would be spread over files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candidates.errors import (
    AlreadyCurrent,
    CandidateExists,
    CandidateNotFound,
    InvalidCandidate,
    InvalidCandidateId,
    NothingToRollBack,
    RegistryError,
)
from candidates.meta import META_FILE, CandidateMeta, read_meta, write_meta
from common import locks
from common.fs import fsync_dir, fsync_tree, pid_alive

logger = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"
RESERVED_IDS = frozenset({CURRENT, PREVIOUS})
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

LOCK_FILE = ".lock"
HISTORY_FILE = ".history.jsonl"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Temp names carry the creating pid, so a dead owner is detected at once; the age limit
# only covers pid reuse, and is long because a trainer may save a large adapter slowly.
STALE_AFTER_S = 24 * 3600.0

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
# The safetensors library refuses headers above 100 MB; a bigger length means corruption.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class Candidate:
    """One candidate folder as list() and get() see it."""

    id: str
    path: Path
    meta: CandidateMeta | None  # None only when meta.json itself is unreadable
    error: str | None  # why validate() refuses it; None when it is servable
    is_current: bool
    is_previous: bool

    @property
    def valid(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PromotionResult:
    new_current: str | None  # None: the base model serves (rolled back past the first one)
    previous: str | None
    forced: bool = False


def new_id() -> str:
    """A sortable id: UTC time to the second plus random hex, e.g. 20261121-031502-a1b2c3."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------
# Folder validation (pure functions: no registry state, no torch)


def _check_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise InvalidCandidate(folder, f"{ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidCandidate(folder, f"cannot read {ADAPTER_CONFIG}: {exc}") from exc
    except ValueError as exc:
        raise InvalidCandidate(folder, f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidCandidate(folder, f"{ADAPTER_CONFIG} must hold a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise InvalidCandidate(folder, f"{ADAPTER_CONFIG} has no peft_type")
    if "r" not in config:
        raise InvalidCandidate(folder, f"{ADAPTER_CONFIG} has no rank 'r'")
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidCandidate(
            folder, f"{ADAPTER_CONFIG} has r={rank!r}; it must be a positive integer"
        )
    return config


def _check_safetensors(folder: Path, path: Path) -> dict[str, Any]:
    """Check the header and that the file is as long as the header says; return the header.

    This catches truncation (an interrupted copy or save) and a garbled header without
    loading a tensor; a bit flip inside the tensor data is not detected.
    """
    name = path.name

    def bad(problem: str) -> InvalidCandidate:
        return InvalidCandidate(folder, f"{name} {problem}")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise bad(f"is truncated: {size} bytes, shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > MAX_SAFETENSORS_HEADER:
                raise bad(f"is corrupt: header length {header_len} is implausible")
            if 8 + header_len > size:
                raise bad(
                    f"is truncated: {size} bytes, but its header alone needs {8 + header_len}"
                )
            raw_header = handle.read(header_len)
    except OSError as exc:
        raise InvalidCandidate(folder, f"cannot read {name}: {exc}") from exc
    try:
        header = json.loads(raw_header)
    except ValueError as exc:
        raise bad(f"is corrupt: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("is corrupt: its header is not a JSON object")

    data_end = 0
    tensors = 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        tensors += 1
        if not isinstance(info, dict):
            raise bad(f"is corrupt: header entry {tensor!r} is not an object")
        offsets = info.get("data_offsets")
        shape = info.get("shape")
        dtype = info.get("dtype")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"is corrupt: tensor {tensor!r} has bad data_offsets {offsets!r}")
        if not isinstance(shape, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
        ):
            raise bad(f"is corrupt: tensor {tensor!r} has bad shape {shape!r}")
        itemsize = SAFETENSORS_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        # Unknown (newer) dtypes are let through rather than refusing a good file.
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise bad(
                f"is corrupt: tensor {tensor!r} ({dtype} {shape}) does not fit "
                f"its data_offsets {offsets}"
            )
        data_end = max(data_end, offsets[1])
    if tensors == 0:
        raise bad("holds no tensors")
    expected = 8 + header_len + data_end
    if size < expected:
        raise bad(f"is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        # The safetensors loader refuses this too (MetadataIncompleteBuffer).
        raise bad(f"is corrupt: {size - expected} trailing bytes not described by its header")
    return header


def _check_ranks(folder: Path, config: dict[str, Any], header: dict[str, Any]) -> None:
    """The LoRA factors' shapes must have the rank adapter_config.json says: an edited `r`
    passes every file check yet fails to load (PEFT: size mismatch), after a promotion."""
    if config.get("rank_pattern"):
        return  # per-module ranks: PEFT's pattern rules decide; the loader checks them
    rank = config["r"]
    # A LoRA on parameters (PEFT's target_parameters, e.g. GPT-OSS's 3-D expert weights as
    # Unsloth targets them) stacks one rank-r factor per expert: that axis is r x experts.
    params = config.get("target_parameters") or []
    wrapped = [p.rsplit(".", 1)[0] for p in params if "." in p]

    def stacked(tensor: str) -> bool:
        return bool(params) and (not wrapped or any(f"{w}." in tensor for w in wrapped))

    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        shape = info["shape"]
        axis = 0 if ".lora_A." in tensor else 1 if ".lora_B." in tensor else None
        if axis is None or len(shape) != 2:
            continue
        if shape[axis] % rank if stacked(tensor) else shape[axis] != rank:
            raise InvalidCandidate(
                folder,
                f"{WEIGHTS_SAFETENSORS} holds {tensor} of shape {shape}, rank {shape[axis]}, "
                f"but {ADAPTER_CONFIG} says r={rank}: the adapter would not load",
            )


def _check_torch_bin(folder: Path, path: Path) -> None:
    """A light check of a torch.save file: only its container, never unpickled here."""
    name = path.name
    try:
        size = path.stat().st_size
        if size == 0:
            raise InvalidCandidate(folder, f"{name} is empty")
        if zipfile.is_zipfile(path):
            # The zip directory sits at the end of the file, so truncation loses it.
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    raise InvalidCandidate(folder, f"{name} is not a torch checkpoint")
            return
        with open(path, "rb") as handle:
            first = handle.read(1)
    except InvalidCandidate:
        raise
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidCandidate(folder, f"{name} is corrupt or truncated: {exc}") from exc
    # torch's legacy (pre-zip) format is a bare pickle stream: opcode PROTO first.
    if first != b"\x80":
        raise InvalidCandidate(folder, f"{name} is corrupt or truncated (not a torch file)")


def _check_weights(folder: Path, config: dict[str, Any]) -> None:
    safetensors = folder / WEIGHTS_SAFETENSORS
    binary = folder / WEIGHTS_BIN
    # PEFT loads the safetensors file when both exist, so that is the one to check.
    if safetensors.is_file():
        _check_ranks(folder, config, _check_safetensors(folder, safetensors))
    elif binary.is_file():
        _check_torch_bin(folder, binary)
    else:
        raise InvalidCandidate(
            folder, f"no adapter weights ({WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN})"
        )


def validate_folder(
    folder: Path, *, expected_id: str | None = None, base_model: str | None = None
) -> CandidateMeta:
    """Check that `folder` is a complete, loadable candidate; return its meta.

    `expected_id` defaults to the folder's name. Raises InvalidCandidate with the problem.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CandidateNotFound(folder, "does not exist")
    if not folder.is_dir():
        raise InvalidCandidate(folder, "is not a directory")
    _check_weights(folder, _check_adapter_config(folder))
    meta = read_meta(folder)
    expected = folder.name if expected_id is None else expected_id
    if meta.id != expected:
        raise InvalidCandidate(
            folder, f"{META_FILE} says id {meta.id!r}, which does not match {expected!r}"
        )
    if base_model is not None and meta.base_model != base_model:
        raise InvalidCandidate(
            folder,
            f"candidate {meta.id} was trained on {meta.base_model}, "
            f"the configured base model is {base_model}",
        )
    return meta


# ---------------------------------------------------------------------------------------
# Helpers for temp names and stale-work cleanup


def _work_name(prefix: str, label: str) -> str:
    # The pid lets prune_temp() tell a crashed writer's leftovers from live work.
    return f"{prefix}{label}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_from_work_name(name: str) -> int | None:
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------


class Registry:
    """Candidate folders under `root` (normally `<home>/candidates`), created if missing."""

    def __init__(self, root: Path | str, *, prune: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        if prune:
            self.prune_temp()

    # -- ids -----------------------------------------------------------------------------

    def validate_id(self, candidate_id: str) -> str:
        """Return `candidate_id` if it names a plain folder inside root, else raise."""
        if not isinstance(candidate_id, str):
            raise InvalidCandidateId(candidate_id, "an id must be a string")
        if not ID_PATTERN.fullmatch(candidate_id):
            raise InvalidCandidateId(
                candidate_id,
                "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if candidate_id.lower() in RESERVED_IDS:
            raise InvalidCandidateId(candidate_id, "this name is reserved for a symlink")
        if ".." in candidate_id:
            raise InvalidCandidateId(candidate_id, "'..' is not allowed in an id")
        # Catches a folder under root that is really a symlink to somewhere else.
        try:
            resolved = (self._real_root / candidate_id).resolve()
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise InvalidCandidateId(candidate_id, f"it does not resolve: {exc}") from exc
        if resolved.parent != self._real_root:
            raise InvalidCandidateId(candidate_id, f"it resolves outside {self.root}")
        return candidate_id

    def new_id(self) -> str:
        """A fresh sortable id not used in this registry yet."""
        while True:
            candidate_id = new_id()
            if not os.path.lexists(self.root / candidate_id):
                return candidate_id

    def path(self, candidate_id: str) -> Path:
        return self.root / self.validate_id(candidate_id)

    # -- reading -------------------------------------------------------------------------

    def validate(self, candidate_id: str, *, base_model: str | None = None) -> CandidateMeta:
        """Raise InvalidCandidate unless the candidate is complete and servable."""
        folder = self.path(candidate_id)
        return validate_folder(folder, expected_id=candidate_id, base_model=base_model)

    def current_id(self) -> str | None:
        return self._read_link(CURRENT)

    def previous_id(self) -> str | None:
        return self._read_link(PREVIOUS)

    def get(self, candidate_id: str) -> Candidate:
        folder = self.path(candidate_id)
        if not os.path.lexists(folder):
            raise CandidateNotFound(folder, "does not exist")
        return self._candidate(candidate_id, self.current_id(), self.previous_id())

    def list(self) -> list[Candidate]:
        """Complete candidate folders (valid or not), oldest first by created_at."""
        current, previous = self.current_id(), self.previous_id()
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                # Temp/trash work, the lock, the links and stray files are not candidates.
                if name.startswith(".") or name.lower() in RESERVED_IDS:
                    continue
                if not ID_PATTERN.fullmatch(name) or not entry.is_dir(follow_symlinks=False):
                    continue
                found.append(self._candidate(name, current, previous))
        return sorted(found, key=self._sort_key)

    def history(self) -> list[dict[str, Any]]:
        """Past promotions and rollbacks, oldest first."""
        path = self.root / HISTORY_FILE
        if not path.exists():
            return []
        events = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    # -- writing -------------------------------------------------------------------------

    def create(self, meta: CandidateMeta, write_files: Callable[[Path], None]) -> Candidate:
        """Build a candidate in a temp folder and rename it into place when complete.

        `write_files(tmp)` saves the adapter into `tmp`; meta.json is written after it.
        On any failure the temp folder is removed and nothing appears under the id.
        """
        candidate_id = self.validate_id(meta.id)
        final = self.root / candidate_id
        # Checked early so a taken id fails before the trainer spends time saving.
        if os.path.lexists(final):
            raise CandidateExists(f"candidate {candidate_id} already exists at {final}")
        tmp = self.root / _work_name(TEMP_PREFIX, candidate_id)
        tmp.mkdir()
        try:
            write_files(tmp)
            write_meta(tmp, meta)
            validate_folder(tmp, expected_id=candidate_id)
            fsync_tree(tmp)
            with self._lock():
                # rename(2) would silently replace an empty folder, so check under the lock.
                if os.path.lexists(final):
                    raise CandidateExists(f"candidate {candidate_id} already exists at {final}")
                os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("created candidate %s", candidate_id)
        return self.get(candidate_id)

    def promote(
        self, candidate_id: str, *, base_model: str | None = None, force: bool = False
    ) -> PromotionResult:
        """Make `candidate_id` the champion; the old champion becomes `previous`.

        `force` belongs to the caller's evaluation gate and is recorded here; integrity is
        checked regardless, because a broken adapter must never be served.
        """
        self.validate_id(candidate_id)
        with self._lock():
            # Validated under the lock so retain() cannot delete it in between.
            self.validate(candidate_id, base_model=base_model)
            old = self.current_id()
            if old == candidate_id:
                raise AlreadyCurrent(f"candidate {candidate_id} is already current")
            previous = self.previous_id()
            # `previous` first: a crash between the two swaps leaves `current` on the old,
            # complete champion, with `previous` pointing at it too.
            if old is not None and self._is_candidate_dir(old):
                self._set_link(PREVIOUS, old)
                previous = old
            elif old is not None:
                logger.warning("current pointed at missing candidate %s; not kept as previous", old)
            self._set_link(CURRENT, candidate_id)
            self._record("promote", current=candidate_id, previous=previous, forced=force)
        logger.info(
            "promoted %s (previous: %s)%s", candidate_id, previous, " [forced]" if force else ""
        )
        return PromotionResult(new_current=candidate_id, previous=previous, forced=force)

    def rollback(self, *, base_model: str | None = None) -> PromotionResult:
        """Swap `current` and `previous`; rolling back twice returns to the start. After the
        first promotion there is no `previous`: rolling back then returns to the base model
        (`current` removed, the demoted champion kept as `previous`)."""
        with self._lock():
            current, previous = self.current_id(), self.previous_id()
            if previous is None and current is not None:
                self._set_link(PREVIOUS, current)
                self._remove_link(CURRENT)
                self._record("rollback", current=None, previous=current, forced=False)
                logger.info("rolled back to the base model (previous: %s)", current)
                return PromotionResult(new_current=None, previous=current)
            if previous is None:
                raise NothingToRollBack(f"nothing to roll back to: no {self.root / PREVIOUS}")
            if previous == current:
                raise NothingToRollBack(
                    f"nothing to roll back to: previous and current are both {current}"
                )
            try:
                self.validate(previous, base_model=base_model)
            except InvalidCandidate as exc:
                raise NothingToRollBack(f"cannot roll back to {previous}: {exc}") from exc
            if current is not None and self._is_candidate_dir(current):
                self._set_link(PREVIOUS, current)
                demoted: str | None = current
                self._set_link(CURRENT, previous)
            else:
                # Nothing servable to demote; `current` first so it is never missing.
                demoted = None
                self._set_link(CURRENT, previous)
                self._remove_link(PREVIOUS)
            self._record("rollback", current=previous, previous=demoted, forced=False)
        logger.info("rolled back to %s (previous: %s)", previous, demoted)
        return PromotionResult(new_current=previous, previous=demoted)

    def retain(self, keep_last: int, keep_trials: int | None = None) -> list[str]:
        """Delete candidates other than current, previous and the newest `keep_last`. With
        `keep_trials`, recipe-search trials (meta status "trial") are counted apart: the
        newest `keep_trials` of them are kept, and they take no place of the others."""
        for name, value in (("keep_last", keep_last), ("keep_trials", keep_trials or 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        removed = []
        with self._lock():
            candidates = self.list()
            trials = {
                c.id
                for c in candidates
                if keep_trials is not None and c.meta is not None and c.meta.status == "trial"
            }
            others = [c.id for c in candidates if c.id not in trials]
            newest_trials = [c.id for c in candidates if c.id in trials]
            # [-0:] would be the whole list, hence the explicit zero cases.
            keep = set(others[-keep_last:]) if keep_last else set()
            keep.update(newest_trials[-keep_trials:] if keep_trials else [])
            keep.update(x for x in (self.current_id(), self.previous_id()) if x is not None)
            for candidate in candidates:
                if candidate.id in keep:
                    continue
                # Rename first: a half-deleted folder must never sit under its id.
                trash = self.root / _work_name(TRASH_PREFIX, candidate.id)
                os.rename(candidate.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                if trash.exists():
                    logger.warning("could not fully delete %s; prune_temp will retry", trash)
                removed.append(candidate.id)
            if removed:
                fsync_dir(self.root)
        if removed:
            logger.info("retention removed %d candidate(s): %s", len(removed), removed)
        return removed

    def copy_champions(self, dest: Path) -> tuple[str | None, str | None]:
        """Copy the `current` and `previous` candidates into `dest` as a registry of their
        own (folders, links, history); return the (current, previous) ids copied.

        Under the lock: a promotion, rollback or retention in between would otherwise pair
        one champion with another's `previous`, or delete a folder half-copied. A link to a
        missing folder is left out (logged): there is nothing to copy.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with self._lock(reading=True):
            current, previous = self.current_id(), self.previous_id()
            copied: dict[str, str | None] = {}
            for name, candidate_id in ((CURRENT, current), (PREVIOUS, previous)):
                if candidate_id is None or not self._is_candidate_dir(candidate_id):
                    copied[name] = None
                    continue
                if not (dest / candidate_id).exists():
                    shutil.copytree(self.root / candidate_id, dest / candidate_id)
                os.symlink(candidate_id, dest / name)
                copied[name] = candidate_id
            if (self.root / HISTORY_FILE).is_file():
                shutil.copy2(self.root / HISTORY_FILE, dest / HISTORY_FILE)
        return copied[CURRENT], copied[PREVIOUS]

    def prune_temp(self, max_age_s: float = STALE_AFTER_S) -> list[str]:
        """Remove `.tmp-*` / `.trash-*` leftovers of crashed writers; return their names.

        An entry is stale when the pid in its name is no longer running, or when it is
        older than `max_age_s` (covers a reused pid). Live work of running processes is
        left alone, so this is safe to call whenever a registry is opened.
        """
        now = time.time()
        removed = []
        with os.scandir(self.root) as entries:
            leftovers = [
                Path(e.path) for e in entries if e.name.startswith((TEMP_PREFIX, TRASH_PREFIX))
            ]
        for path in leftovers:
            try:
                age = now - path.lstat().st_mtime
            except FileNotFoundError:
                continue
            pid = _pid_from_work_name(path.name)
            if age < max_age_s and (pid is None or pid <= 0 or pid_alive(pid)):
                continue
            _remove_path(path)
            removed.append(path.name)
        if removed:
            logger.info("removed stale work in %s: %s", self.root, removed)
        return removed

    # -- internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, *, reading: bool = False) -> Iterator[None]:
        try:
            fd = locks.take(self.root / LOCK_FILE)
        except OSError as exc:
            if not (reading and exc.errno == errno.EROFS):
                raise
            # A read-only mount: nothing can change the registry, so a reader needs no lock.
            yield
            return
        try:
            yield
        finally:
            locks.release(fd)

    def _read_link(self, name: str) -> str | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                logger.error("%s is not a symlink; ignoring it", link)
                return None
            raise
        if not ID_PATTERN.fullmatch(target) or target.lower() in RESERVED_IDS:
            logger.error("%s points at %r, which is not a candidate id; ignoring it", link, target)
            return None
        if not self._is_candidate_dir(target):
            logger.warning("%s points at %s, which does not exist (dangling link)", link, target)
        return target

    def _is_candidate_dir(self, candidate_id: str) -> bool:
        path = self.root / candidate_id
        return path.is_dir() and not path.is_symlink()

    def _set_link(self, name: str, target_id: str) -> None:
        link = self.root / name
        if os.path.lexists(link) and not link.is_symlink():
            raise RegistryError(f"{link} exists and is not a symlink; refusing to replace it")
        # Relative target (just the id) so the home folder can be moved or copied.
        tmp = self.root / _work_name(TEMP_PREFIX, f"link-{name}")
        os.symlink(target_id, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(self.root)

    def _remove_link(self, name: str) -> None:
        link = self.root / name
        if link.is_symlink():
            link.unlink()
            fsync_dir(self.root)

    def _record(self, action: str, **fields: Any) -> None:
        event = {"at": datetime.now(UTC).isoformat(), "action": action, **fields}
        try:
            with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
        except OSError:
            # The links already changed; failing now would misreport what happened.
            logger.exception("could not append to %s", self.root / HISTORY_FILE)

    def _candidate(self, candidate_id: str, current: str | None, previous: str | None) -> Candidate:
        folder = self.root / candidate_id
        meta: CandidateMeta | None
        error: str | None = None
        try:
            meta = validate_folder(folder, expected_id=candidate_id)
        except InvalidCandidate as exc:
            error = str(exc)
            try:
                meta = read_meta(folder)
            except InvalidCandidate:
                meta = None
        return Candidate(
            id=candidate_id,
            path=folder,
            meta=meta,
            error=error,
            is_current=candidate_id == current,
            is_previous=candidate_id == previous,
        )

    @staticmethod
    def _sort_key(candidate: Candidate) -> tuple[datetime, str]:
        if candidate.meta is not None:
            return candidate.meta.created_at, candidate.id
        try:
            mtime = candidate.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return datetime.fromtimestamp(mtime, UTC), candidate.id
