"""The adapter registry on disk: candidate folders, meta.json, `current` / `previous`.

A plain library (no torch): the orchestrator, the workers and the CLI all import it.
"""

from candidates.errors import (
    AlreadyCurrent,
    CandidateExists,
    CandidateNotFound,
    InvalidCandidate,
    InvalidCandidateId,
    NothingToRollBack,
    RegistryError,
)
from candidates.meta import SCHEMA_VERSION, CandidateMeta, read_meta, update_meta, write_meta
from candidates.registry import (
    Candidate,
    PromotionResult,
    Registry,
    new_id,
    validate_folder,
)

__all__ = [
    "SCHEMA_VERSION",
    "AlreadyCurrent",
    "Candidate",
    "CandidateExists",
    "CandidateMeta",
    "CandidateNotFound",
    "InvalidCandidate",
    "InvalidCandidateId",
    "NothingToRollBack",
    "PromotionResult",
    "Registry",
    "RegistryError",
    "new_id",
    "read_meta",
    "update_meta",
    "validate_folder",
    "write_meta",
]
