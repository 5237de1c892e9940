"""ORM models of the whetstone store.

The tables themselves are created only by the Alembic migrations in data/migrations; these
classes must match them (tests/test_store.py compares the two).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    and_,
    func,
    select,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Allowed values, checked by the store before anything is written.
ROLES = ("system", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")
FINISH_REASONS = ("stop", "length", "tool_calls", "cut_off", "error")
# Where an imported conversation came from (data/imports.py); null: made here.
IMPORT_SOURCES = ("chatgpt", "openwebui", "jsonl")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "skipped", "cancelled")
RUN_FINISHED = ("succeeded", "failed", "skipped", "cancelled")
EVAL_DECISIONS = ("promote", "reject")
PROMOTION_ACTIONS = ("promote", "rollback", "auto_rollback")
# A note's status (migration 0007): given to the model, or forgotten (a tombstone without its
# text). "learned" is what the memory's list says of an active note the serving adapter
# answers right (NoteCheck, 0008): it depends on which adapter serves, so it is not stored.
NOTE_STATUSES = ("active", "learned", "forgotten")

# Named constraints keep future SQLite batch migrations (table rebuilds) deterministic.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Not mapped here: the full-text indexes of messages and titles (migration 0005) and of notes
# (0007), SQLite FTS5 virtual tables, and the shadow tables FTS5 keeps beside them. The store
# queries them in SQL; autogenerate and the schema test leave them out (include_name below).
SEARCH_TABLES = ("messages_fts", "conversations_fts", "notes_fts")


def include_name(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Alembic's include_name hook: everything but the full-text index tables."""
    if type_ == "table" and name is not None:
        return not any(name == t or name.startswith(f"{t}_") for t in SEARCH_TABLES)
    return True


ID = String(64)  # ids made by new_id()
NAME = String(255)  # caller-chosen ids (candidate folder names), model names


def new_id(prefix: str) -> str:
    """A fresh random id such as ``conv_3f9a0c1d2e4b5a69`` (prefix, "_", 16 hex chars)."""
    return f"{prefix}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type and hands back naive values; storing UTC only and tagging
    results with UTC on the way out keeps comparisons and ordering correct everywhere.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes timezone-aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Message(Base):
    """One turn of a conversation; assistant turns carry how they were generated.

    Its content is indexed for search by messages_fts, keyed on the implicit rowid and kept in
    step by triggers (migration 0005): a migration that rebuilds this table must make them
    again.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "position"),
        CheckConstraint("role IN ('system', 'user', 'assistant', 'tool')", name="role"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    # No separate index: the (conversation_id, position) unique constraint serves lookups.
    conversation_id: Mapped[str] = mapped_column(
        ID, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # The analysis channel of harmony models; kept apart so it never leaks into training text.
    reasoning: Mapped[str | None] = mapped_column(Text)
    # For an assistant turn: the user turn it answers. Regenerated answers share it, which is
    # what lets two answers to one prompt form a preference pair.
    reply_to_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    adapter_id: Mapped[str | None] = mapped_column(NAME)  # null: the base model answered
    base_model: Mapped[str | None] = mapped_column(NAME)
    generation: Mapped[dict[str, Any] | None] = mapped_column()
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # Of prompt_tokens, those the worker's kept conversation cache held (null: before 0009).
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
    # An assistant turn's function calls, OpenAI's shape: [{id, type, function: {name,
    # arguments}}]; a tool turn names the call it answers.
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON())
    tool_call_id: Mapped[str | None] = mapped_column(ID)
    # Which split an answer's feedback belongs to (data/splits.py): drawn from the sequence of
    # its feedback's kind (placement_kind, placement_ordinal) when it first gets feedback, and
    # drawn again when the kind changes (rated, then corrected) until a training run first
    # uses it (used_at); never changed after: moving an answer a trainer has seen into the
    # holdout would let the gate judge on training data.
    placement: Mapped[float | None] = mapped_column(Float)
    placement_kind: Mapped[str | None] = mapped_column(String(16))
    placement_ordinal: Mapped[int | None] = mapped_column(Integer)
    used_at: Mapped[datetime | None] = mapped_column()
    # When a gate first judged a candidate on this held-out answer: from then on it is
    # trained on (the rolling holdout, data/splits.py).
    judged_at: Mapped[datetime | None] = mapped_column()

    # lazy="raise": objects outlive their session, so a forgotten eager load must fail loudly
    # instead of silently querying (or failing later with a detached-instance error).
    current_feedback: Mapped[Feedback | None] = relationship(
        primaryjoin=lambda: and_(Feedback.message_id == Message.id, Feedback.is_current == true()),
        viewonly=True,
        uselist=False,
        lazy="raise",
    )


class Conversation(Base):
    """A chat. A forgotten conversation keeps only this row, as a tombstone."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    system_prompt: Mapped[str | None] = mapped_column(Text)
    reasoning_effort: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    forgotten_at: Mapped[datetime | None] = mapped_column()
    # An imported conversation (data/imports.py): its source, its id there (or a hash of the
    # JSONL line that held it) and when it came; all null for a conversation made here. Its
    # created_at and updated_at, and its messages' created_at, are the export's own times.
    source: Mapped[str | None] = mapped_column(String(32))
    external_id: Mapped[str | None] = mapped_column(String(255))
    imported_at: Mapped[datetime | None] = mapped_column()

    message_count: Mapped[int] = column_property(
        select(func.count(Message.id))
        .where(Message.conversation_id == id)
        .correlate_except(Message)
        .scalar_subquery()
    )
    messages: Mapped[list[Message]] = relationship(
        order_by=Message.position, lazy="raise", viewonly=True
    )


# The conversation list (not forgotten, newest first; data.store.list_conversations) read in
# index order, without a sort; partial, so tombstones cost it nothing.
Index(
    "ix_conversations_listed",
    Conversation.updated_at,
    Conversation.id,
    sqlite_where=Conversation.forgotten_at.is_(None),
    postgresql_where=Conversation.forgotten_at.is_(None),
)
# A conversation is imported once (migration 0006); nulls (made here) are never compared.
Index(
    "uq_conversations_source_external_id",
    Conversation.source,
    Conversation.external_id,
    unique=True,
)
# The list's order: newest first, the id breaking ties in the same direction, so the index
# above read backwards gives it (the conversation list and the search's LIKE scan).
CONVERSATIONS_LISTED = (Conversation.updated_at.desc(), Conversation.id.desc())


class Feedback(Base):
    """One feedback submission. History is kept; exactly one row per message is current."""

    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint("rating IS NULL OR (rating >= 1 AND rating <= 5)", name="rating_range"),
        CheckConstraint(
            "rating IS NOT NULL OR correction IS NOT NULL OR comment IS NOT NULL",
            name="not_empty",
        ),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    message_id: Mapped[str] = mapped_column(
        ID, ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    rating: Mapped[int | None] = mapped_column(Integer)
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


# At most one current feedback row per message, enforced by the database too.
Index(
    "uq_feedback_current",
    Feedback.message_id,
    unique=True,
    sqlite_where=Feedback.is_current == true(),
    postgresql_where=Feedback.is_current == true(),
)


class TrainingRun(Base):
    """One training job, from queued to a finished status."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    profile: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)  # why it was skipped
    error: Mapped[str | None] = mapped_column(Text)
    candidate_id: Mapped[str | None] = mapped_column(NAME)
    # Counts, ids and the high-water mark of the feedback the run trained on.
    data_snapshot: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pid: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


# Candidates, evaluations and promotions refer to each other by plain string ids on purpose:
# the history must stay recordable (and readable) after a candidate folder is pruned.


class CandidateRecord(Base):
    """A trained adapter; the id is its folder name under <home>/candidates/."""

    __tablename__ = "candidates"

    id: Mapped[str] = mapped_column(NAME, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("training_runs.id", ondelete="SET NULL"), index=True
    )
    base_model: Mapped[str] = mapped_column(NAME)
    parent_id: Mapped[str | None] = mapped_column(NAME)
    status: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Evaluation(Base):
    """A candidate measured against the champion, and what the gate decided."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    candidate_id: Mapped[str] = mapped_column(NAME, index=True)
    champion_id: Mapped[str | None] = mapped_column(NAME)  # null: the base model
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(Text)
    report_path: Mapped[str | None] = mapped_column(Text)


class Promotion(Base):
    """Audit log of what became current, and from what."""

    __tablename__ = "promotions"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    candidate_id: Mapped[str | None] = mapped_column(NAME)  # null: back to the base model
    previous_id: Mapped[str | None] = mapped_column(NAME)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Note(Base):
    """A fact the person taught, given to the model from the next message on (migration
    0007): from a correction (source_message_id, adapter_id: the answer and the adapter that
    was wrong) or written by hand (both null)."""

    __tablename__ = "notes"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'learned', 'forgotten')", name="status"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    question: Mapped[str | None] = mapped_column(Text)  # null: a note without a question
    text: Mapped[str] = mapped_column(Text)
    # No foreign key: forgetting the conversation deletes the note in the same transaction,
    # and a key would make SQLite order those deletes.
    source_message_id: Mapped[str | None] = mapped_column(ID, index=True, unique=True)
    conversation_id: Mapped[str | None] = mapped_column(ID, index=True)
    adapter_id: Mapped[str | None] = mapped_column(NAME)  # null: the base model was wrong
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NoteCheck(Base):
    """Whether an adapter answers a note's question right without the note (migration 0008):
    asked by the evaluation of the candidate that is this adapter. While that adapter serves,
    a note it answers right is learned: no longer given to the model. A rollback serves
    another adapter, and its own checks apply: what the rolled-back one retired comes back."""

    __tablename__ = "note_checks"

    note_id: Mapped[str] = mapped_column(
        ID, ForeignKey("notes.id", ondelete="CASCADE"), primary_key=True
    )
    adapter_id: Mapped[str] = mapped_column(NAME, primary_key=True, index=True)
    answered_right: Mapped[bool] = mapped_column(Boolean)
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
