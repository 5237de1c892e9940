"""Exceptions raised by the candidate registry.

Every error says which id or folder it is about, because the CLI and the HTTP API show
these messages to the person as they are.
"""

from __future__ import annotations

from pathlib import Path


class RegistryError(Exception):
    """Base of everything the registry raises on purpose."""


class InvalidCandidateId(RegistryError, ValueError):
    """An id that is not a plain folder name inside the registry root."""

    def __init__(self, candidate_id: object, reason: str) -> None:
        self.candidate_id = candidate_id
        self.reason = reason
        super().__init__(f"invalid candidate id {candidate_id!r}: {reason}")


class InvalidCandidate(RegistryError):
    """A candidate folder that must not be served (missing, incomplete or corrupt)."""

    def __init__(self, folder: Path, problem: str) -> None:
        self.folder = folder
        self.problem = problem
        super().__init__(f"candidate folder {folder}: {problem}")


class CandidateNotFound(InvalidCandidate):
    """The id is well formed but no folder carries it."""


class CandidateExists(RegistryError):
    """create() was asked for an id that is already taken."""


class AlreadyCurrent(RegistryError):
    """promote() was asked for the candidate that is already the champion."""


class NothingToRollBack(RegistryError):
    """rollback() has no usable `previous` candidate to return to."""
