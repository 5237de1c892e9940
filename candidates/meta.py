"""meta.json: what a candidate is, how it was made, and what evaluation said about it."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from candidates.errors import InvalidCandidate
from common.fs import atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_FILE = "meta.json"


def _newer_schema_message(version: int) -> str:
    return (
        f"meta.json has schema_version {version}, newer than this whetstone understands "
        f"({SCHEMA_VERSION}); upgrade whetstone to read this candidate"
    )


class CandidateMeta(BaseModel):
    """The contents of `<candidate>/meta.json`."""

    # Unknown keys are refused so a typo ("metircs") fails loudly instead of vanishing.
    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    id: str = Field(min_length=1)
    base_model: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    parent: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    duration_s: float | None = Field(default=None, ge=0)
    status: str = "trained"
    # What the evaluation's report says (candidates.reports.ReportView), kept so the report
    # can be rendered again when something happens later (a rollback). Free-form here so an
    # older view never makes the whole candidate unreadable; reports.py validates it.
    report: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int) -> int:
        if version > SCHEMA_VERSION:
            raise ValueError(_newer_schema_message(version))
        return version

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # A naive time is ambiguous (local? UTC?) and would sort wrongly against others.
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("created_at must carry a timezone (UTC)")
        return value.astimezone(UTC)


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(item) for item in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def read_meta(folder: Path) -> CandidateMeta:
    """Read and validate `folder/meta.json`; raises InvalidCandidate naming the problem."""
    folder = Path(folder)
    path = folder / META_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidCandidate(folder, f"{META_FILE} is missing") from None
    except OSError as exc:
        raise InvalidCandidate(folder, f"cannot read {META_FILE}: {exc}") from exc
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise InvalidCandidate(folder, f"{META_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidCandidate(folder, f"{META_FILE} must hold a JSON object")
    # Checked before full validation: a newer writer likely added keys too, and "upgrade"
    # is the useful message, not a list of unknown fields.
    version = payload.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise InvalidCandidate(folder, _newer_schema_message(version))
    try:
        return CandidateMeta.model_validate(payload)
    except ValidationError as exc:
        raise InvalidCandidate(
            folder, f"{META_FILE} is invalid: {_format_validation_error(exc)}"
        ) from exc


def write_meta(folder: Path, meta: CandidateMeta) -> None:
    """Write `folder/meta.json` atomically (temp file, fsync, os.replace)."""
    atomic_write_text(Path(folder) / META_FILE, meta.model_dump_json(indent=2) + "\n")


def update_meta(folder: Path, **changes: Any) -> CandidateMeta:
    """Replace top-level fields of meta.json (e.g. metrics=..., status=...) atomically.

    Fields are replaced, not merged: pass `metrics={**meta.metrics, **new}` to keep old
    keys. The result is validated like a fresh meta, so a misspelt field is refused.
    """
    folder = Path(folder)
    if "id" in changes:
        raise ValueError("update_meta cannot change a candidate's id (it names the folder)")
    current = read_meta(folder)
    updated = CandidateMeta.model_validate({**current.model_dump(), **changes})
    write_meta(folder, updated)
    logger.debug("updated %s in %s", sorted(changes), folder / META_FILE)
    return updated
