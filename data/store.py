"""The store: conversations, messages and feedback, over SQLAlchemy; with the training
history (data/training_history.py) mixed in, one object the whole app opens.

Every method opens and closes its own short session and returns ORM objects loaded with
``expire_on_commit=False``: their columns stay readable after the session is gone.
Relationships are ``lazy="raise"``; the methods that return them say so and load them.

The ORM models are in models.py, the schema in migrations/; what the store accepts is
checked by validation.py and feedback_rules.py, and history search is search.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from data import db, search
from data.errors import Gone, InvalidInput, NotFound
from data.feedback_rules import carried_over, check_feedback, feedback_target, mark_first, place
from data.memory import Memory, note_correction
from data.models import (
    CONVERSATIONS_LISTED,
    FINISH_REASONS,
    REASONING_EFFORTS,
    ROLES,
    RUN_STATUSES,
    CandidateRecord,
    Conversation,
    Feedback,
    Message,
    TrainingRun,
    new_id,
    utcnow,
)
from data.search import SearchHit
from data.training_history import TrainingHistory
from data.validation import (
    COMPLETE_FIELDS,
    MESSAGE_FIELDS,
    check_choice,
    check_known_fields,
    check_message_fields,
    check_text,
    check_time,
)

log = logging.getLogger(__name__)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "leave as is", where None means "clear"


class Store(TrainingHistory, Memory):
    """The whetstone database. ``Store(url)`` opens it and migrates it to the newest schema.
    Its training-history methods (runs, candidates, evaluations, promotions) are
    TrainingHistory's, its notes (the memory) Memory's.

    With ``migrate=False`` the schema is left as is, but a database written by a newer
    whetstone is still refused (SchemaTooNewError).
    """

    def __init__(self, url: str, *, migrate: bool = True, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.engine = db.make_engine(url, busy_timeout_ms=busy_timeout_ms)
        try:
            self.schema_revision: str | None = (
                db.migrate(self.engine) if migrate else db.check_schema(self.engine)
            )
        except BaseException:
            self.engine.dispose()
            raise
        self._write_sessions = sessionmaker(db.write_engine(self.engine), expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection. The Store must not be used afterwards."""
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read-write session in one transaction: committed on exit, rolled back on error.

        On SQLite it takes the write lock at the start (BEGIN IMMEDIATE, waiting up to
        busy_timeout), so read-then-write code cannot hit "database is locked" half-way.
        """
        with self._write_sessions() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reads only; it does not block writers (SQLite WAL)."""
        with self._read_sessions() as session, session.begin():
            yield session

    # --- conversations ------------------------------------------------------------------

    @staticmethod
    def _conversation(
        session: Session, conversation_id: str, *, forgotten_ok: bool = False
    ) -> Conversation:
        conversation = session.get(Conversation, conversation_id)
        if conversation is None:
            raise NotFound(f"unknown conversation {conversation_id}")
        if conversation.forgotten_at is not None and not forgotten_ok:
            raise Gone(f"conversation {conversation_id} was forgotten")
        return conversation

    def create_conversation(
        self,
        *,
        system_prompt: str | None = None,
        reasoning_effort: str | None = None,
        title: str | None = None,
    ) -> Conversation:
        """A new empty conversation (id ``conv_...``)."""
        check_text("system_prompt", system_prompt)
        check_text("title", title)
        check_choice("reasoning_effort", reasoning_effort, REASONING_EFFORTS)
        with self.session() as session:
            now = utcnow()
            conversation = Conversation(
                id=new_id("conv"),
                title=title,
                system_prompt=system_prompt,
                reasoning_effort=reasoning_effort,
                created_at=now,
                updated_at=now,
            )
            session.add(conversation)
            session.flush()
            session.refresh(conversation)  # loads message_count
        return conversation

    def get_conversation(self, conversation_id: str) -> Conversation:
        """The conversation with ``.messages`` (position order) and each message's
        ``.current_feedback`` loaded. NotFound for unknown ids, Gone for forgotten ones."""
        with self.read_session() as session:
            conversation = session.scalar(
                select(Conversation)
                .where(Conversation.id == conversation_id)
                .options(selectinload(Conversation.messages).selectinload(Message.current_feedback))
            )
            if conversation is None:
                raise NotFound(f"unknown conversation {conversation_id}")
            if conversation.forgotten_at is not None:
                raise Gone(f"conversation {conversation_id} was forgotten")
        return conversation

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[Conversation]:
        """Conversations not forgotten, most recently updated first, each with
        ``.message_count`` (messages are not loaded)."""
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Conversation)
                    .where(Conversation.forgotten_at.is_(None))
                    .order_by(*CONVERSATIONS_LISTED)
                    .limit(max(0, limit))
                    .offset(max(0, offset))
                )
            )

    @cached_property
    def _full_text(self) -> bool:
        """Whether the database has the full-text indexes (SQLite at 0005 or later)."""
        return search.has_full_text(self.engine)

    def search_conversations(
        self, q: str, limit: int = 50, offset: int = 0, *, prefix: bool = True
    ) -> list[SearchHit]:
        """Conversations not forgotten with a user or assistant message, or a title, holding
        every word of ``q`` (any order, case and accents ignored), most recently updated
        first, each with ``.message_count`` and a snippet of the match.

        ``q`` is plain words (search_words: FTS syntax in it is only text); with ``prefix``
        a word of 3 or more letters also matches the start of a longer one (search as you
        type). InvalidInput naming ``q`` for a blank or too long query.
        """
        words = search.search_words(q)
        limit, offset = max(0, limit), max(0, offset)
        full_text = self._full_text  # asked on its own connection, once
        with self.read_session() as session:
            if not full_text:
                return search.search_like(session, words, limit, offset)
            return search.search_full_text(session, words, limit, offset, prefix=prefix)

    def rename_conversation(self, conversation_id: str, title: str | None) -> Conversation:
        """Set the title (blank or None clears it). Does not change updated_at."""
        check_text("title", title)
        with self.session() as session:
            conversation = self._conversation(session, conversation_id)
            conversation.title = (title.strip() or None) if title is not None else None
        return conversation

    def update_conversation(
        self,
        conversation_id: str,
        *,
        system_prompt: str | None = UNSET,
        reasoning_effort: str | None = UNSET,
    ) -> Conversation:
        """Change the system prompt and/or reasoning effort; None clears, UNSET leaves as is."""
        if system_prompt is not UNSET:
            check_text("system_prompt", system_prompt)
        if reasoning_effort is not UNSET:
            check_choice("reasoning_effort", reasoning_effort, REASONING_EFFORTS)
        with self.session() as session:
            conversation = self._conversation(session, conversation_id)
            if system_prompt is not UNSET:
                conversation.system_prompt = system_prompt
            if reasoning_effort is not UNSET:
                conversation.reasoning_effort = reasoning_effort
        return conversation

    def forget_conversation(self, conversation_id: str) -> None:
        """Delete the conversation's messages, feedback and notes; keep a tombstone row.

        The tombstone has forgotten_at set and title/system_prompt cleared, so the API can
        answer 410 and nothing of it reaches training or exports. Idempotent; NotFound for
        an id never stored.
        """
        with self.session() as session:
            conversation = self._conversation(session, conversation_id, forgotten_ok=True)
            if conversation.forgotten_at is not None:
                return
            message_ids = select(Message.id).where(Message.conversation_id == conversation_id)
            feedback_rows = session.execute(
                delete(Feedback).where(Feedback.message_id.in_(message_ids))
            ).rowcount
            # Replies point at messages of the same conversation: one statement deletes them
            # all, so the self-referencing foreign key is satisfied when it is checked.
            message_rows = session.execute(
                delete(Message).where(Message.conversation_id == conversation_id)
            ).rowcount
            note_rows = self._delete_conversation_notes(session, conversation_id)
            conversation.forgotten_at = utcnow()
            conversation.title = None
            conversation.system_prompt = None
            session.flush()  # the title's trigger takes it out of the index
            self._purge_search_index(session)
        self._checkpoint()
        log.info(
            "forgot conversation %s (%d messages, %d feedback rows, %d notes deleted)",
            conversation_id,
            message_rows,
            feedback_rows,
            note_rows,
        )

    def _purge_search_index(self, session: Session) -> None:
        """Merge the full-text indexes' segments. Deleting from FTS5 only records that the
        rows are gone; their words stay in the older segments (in the file) until those are
        merged. 'optimize' merges them all, leaving the forgotten words nowhere; the pages it
        frees are zeroed (secure_delete). (FTS5's own secure-delete option would spare the
        merge, but needs SQLite 3.42 and makes the file unreadable to older ones.)"""
        if self._full_text:
            search.purge_index(session)

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database and empty it. Deleted rows are zeroed
        (secure_delete), but the WAL still holds the pages as they were written until a
        checkpoint: a forgotten conversation was readable there. A reader mid-snapshot can
        hold the WAL back; the next checkpoint then finishes the job."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as connection:
            busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if busy:
            log.info("the write-ahead log is still in use by a reader; it is emptied later")

    # --- messages -----------------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, **fields: Any) -> Message:
        """Append a message at the next position and touch the conversation's updated_at.

        ``fields``: any of reasoning, reply_to_id, adapter_id, base_model, generation (dict),
        prompt_tokens, completion_tokens, latency_ms, ttft_ms, finish_reason, created_at,
        completed_at. An assistant message without reply_to_id answers the conversation's
        latest user message. An assistant message without finish_reason is a placeholder for
        an answer still streaming (finish it with complete_message); other messages are
        complete when added.
        """
        check_choice("role", role, ROLES, nullable=False)
        check_text("content", content, nullable=False)
        check_known_fields(fields, MESSAGE_FIELDS, "message")
        check_message_fields(fields)
        if role != "assistant" and fields.get("reply_to_id") is not None:
            raise InvalidInput(f"reply_to_id is for assistant messages; this one is a {role}")

        with self.session() as session:
            conversation = self._conversation(session, conversation_id)
            last = session.scalar(
                select(func.max(Message.position)).where(Message.conversation_id == conversation_id)
            )
            if role == "assistant":
                fields["reply_to_id"] = self._reply_to(
                    session, conversation_id, fields.get("reply_to_id")
                )
            now = utcnow()
            fields.setdefault("created_at", now)
            if role != "assistant" or fields.get("finish_reason") is not None:
                fields.setdefault("completed_at", fields["created_at"])
            message = Message(
                id=new_id("msg"),
                conversation_id=conversation_id,
                position=0 if last is None else last + 1,
                role=role,
                content=content,
                **fields,
            )
            message.current_feedback = None
            session.add(message)
            conversation.updated_at = now
        return message

    @staticmethod
    def _reply_to(session: Session, conversation_id: str, reply_to_id: str | None) -> str | None:
        if reply_to_id is None:
            return session.scalar(
                select(Message.id)
                .where(Message.conversation_id == conversation_id, Message.role == "user")
                .order_by(Message.position.desc())
                .limit(1)
            )
        target = session.get(Message, reply_to_id)
        if target is None or target.conversation_id != conversation_id:
            raise InvalidInput(
                f"reply_to_id {reply_to_id} is not a message of conversation {conversation_id}"
            )
        if target.role not in ("user", "tool"):
            raise InvalidInput(
                f"reply_to_id must name the user message being answered; "
                f"{reply_to_id} is a {target.role} message"
            )
        return reply_to_id

    def complete_message(
        self, message_id: str, *, content: str, finish_reason: str, **fields: Any
    ) -> Message:
        """Store the final text of a (streamed) message and how it ended.

        finish_reason is one of stop, length, cut_off (a partial answer: the client went
        away), error. ``fields`` as for add_message, except reply_to_id and created_at;
        completed_at defaults to now. Touches the conversation's updated_at.
        """
        check_text("content", content, nullable=False)
        check_choice("finish_reason", finish_reason, FINISH_REASONS, nullable=False)
        check_known_fields(fields, COMPLETE_FIELDS, "message completion")
        check_message_fields(fields)
        with self.session() as session:
            message = self._message(session, message_id)
            now = utcnow()
            message.content = content
            message.finish_reason = finish_reason
            message.completed_at = fields.pop("completed_at", None) or now
            for name, value in fields.items():
                setattr(message, name, value)
            self._conversation(session, message.conversation_id).updated_at = now
            message.current_feedback = session.scalar(
                select(Feedback).where(Feedback.message_id == message_id, Feedback.is_current)
            )
        return message

    def save_partial(self, message_id: str, content: str, *, reasoning: str | None = None) -> None:
        """Store the text streamed so far of an unfinished answer (a kill -9 keeps it)."""
        check_text("content", content, nullable=False)
        check_text("reasoning", reasoning)
        with self.session() as session:
            message = self._message(session, message_id)
            if message.finish_reason is not None:
                raise InvalidInput(f"message {message_id} is already finished")
            message.content = content
            message.reasoning = reasoning

    def cut_off_unfinished(self) -> int:
        """Mark answers left unfinished by a dead worker as cut_off; returns how many."""
        with self.session() as session:
            unfinished = session.scalars(
                select(Message).where(Message.role == "assistant", Message.finish_reason.is_(None))
            ).all()
            now = utcnow()
            for message in unfinished:
                message.finish_reason = "cut_off"
                message.completed_at = now
        return len(unfinished)

    @staticmethod
    def _message(session: Session, message_id: str) -> Message:
        message = session.get(Message, message_id)
        if message is None:
            raise NotFound(
                f"unknown message {message_id} (never stored, or its conversation was forgotten)"
            )
        return message

    def get_message(self, message_id: str) -> Message:
        """One message with ``.current_feedback`` loaded; NotFound if unknown."""
        with self.read_session() as session:
            message = session.scalar(
                select(Message)
                .where(Message.id == message_id)
                .options(selectinload(Message.current_feedback))
            )
            if message is None:
                raise NotFound(
                    f"unknown message {message_id} "
                    "(never stored, or its conversation was forgotten)"
                )
        return message

    # --- feedback -----------------------------------------------------------------------

    def add_feedback(
        self,
        message_id: str,
        *,
        rating: int | None = None,
        correction: str | None = None,
        comment: str | None = None,
    ) -> Feedback:
        """Record a rating (1-5), a correction (the answer wanted) and/or a comment for an
        assistant message; returns the new current feedback.

        Fields left out carry over from the previous current feedback (rating 4, then later
        a correction: current = rating 4 + correction); the previous row stays as history.
        A correction given makes the answer's note (data/memory.py), or rewrites it.
        Raises FeedbackError (a ValueError) naming the problem, and changes nothing, for a
        bad rating, a blank correction, nothing given, an unknown message (also a NotFound),
        a non-assistant message, or a forgotten conversation (also a Gone).
        """
        comment = check_feedback(rating, correction, comment)
        # Only a correction sent now (re)writes the note: one carried over with a new rating
        # must not bring back a note the person forgot.
        taught = correction is not None
        with self.session() as session:
            message = feedback_target(session, message_id)
            previous = session.scalar(
                select(Feedback).where(Feedback.message_id == message_id, Feedback.is_current)
            )
            if previous is not None:
                rating, correction, comment = carried_over(previous, rating, correction, comment)
                # Flip before inserting: the partial unique index allows one current row.
                session.execute(
                    update(Feedback)
                    .where(Feedback.message_id == message_id, Feedback.is_current)
                    .values(is_current=False)
                )
            place(session, message, correction, rating)
            feedback = Feedback(
                id=new_id("fb"),
                message_id=message_id,
                rating=rating,
                correction=correction,
                comment=comment,
                is_current=True,
                created_at=utcnow(),
            )
            session.add(feedback)
            if taught and feedback.correction is not None:
                note_correction(session, message, feedback.correction)
        log.debug("feedback %s on %s: rating=%s", feedback.id, message_id, feedback.rating)
        return feedback

    def count_judged(self) -> int:
        """Answers a gate has judged on (data/splits.py: trained on since)."""
        with self.read_session() as session:
            return (
                session.scalar(select(func.count(Message.id)).where(Message.judged_at.is_not(None)))
                or 0
            )

    def mark_used(self, message_ids: Iterable[str]) -> int:
        """A training run uses these answers' feedback (train, validation or holdout): their
        placements never change again. Returns how many were newly marked."""
        with self.session() as session:
            return mark_first(session, Message.used_at, message_ids, utcnow())

    def freeze_placements(self) -> set[str]:
        """Mark every answer placed so far as used (a training run starts reading them) and
        return their ids: a correction arriving later cannot move any of them."""
        with self.session() as session:
            placed = list(session.scalars(select(Message.id).where(Message.placement.is_not(None))))
            mark_first(session, Message.used_at, placed, utcnow())
        return set(placed)

    def current_feedback(self, message_id: str) -> Feedback | None:
        """The merged, current feedback of a message, or None; NotFound if unknown."""
        with self.read_session() as session:
            self._message(session, message_id)
            return session.scalar(
                select(Feedback).where(Feedback.message_id == message_id, Feedback.is_current)
            )

    def feedback_history(self, message_id: str) -> list[Feedback]:
        """Every feedback row of a message, oldest first (the last one is current)."""
        with self.read_session() as session:
            self._message(session, message_id)
            return list(
                session.scalars(
                    select(Feedback)
                    .where(Feedback.message_id == message_id)
                    .order_by(Feedback.created_at, Feedback.is_current)
                )
            )

    def feedback_high_water(self) -> datetime | None:
        """created_at of the newest current feedback, or None: a data snapshot's mark."""
        with self.read_session() as session:
            return session.scalar(select(func.max(Feedback.created_at)).where(Feedback.is_current))

    def count_feedback_since(self, since: datetime | None) -> int:
        """Current feedback created after ``since`` (all of it for None): "new feedback since
        the last data snapshot". An edited feedback counts as new (its new row is current)."""
        check_time("since", since)
        stmt = select(func.count(Feedback.id)).where(Feedback.is_current)
        if since is not None:
            stmt = stmt.where(Feedback.created_at > since)
        with self.read_session() as session:
            return session.scalar(stmt) or 0

    def last_message_at(self) -> datetime | None:
        """When the newest message was stored: how long chat has been idle."""
        with self.read_session() as session:
            return session.scalar(select(func.max(Message.created_at)))

    def answering_now(self, within_s: float = 600) -> bool:
        """Whether an answer is being generated: one stored (as a placeholder) in the last
        `within_s` seconds that has not finished (a crashed worker's never does: hence the
        bound)."""
        since = utcnow() - timedelta(seconds=within_s)
        with self.read_session() as session:
            found = session.scalar(
                select(Message.id)
                .where(
                    Message.role == "assistant",
                    Message.finish_reason.is_(None),
                    Message.created_at >= since,
                )
                .limit(1)
            )
        return found is not None

    def adapter_ratings(
        self,
        adapter_id: str | None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[int]:
        """Current ratings of answers the adapter produced (None: the base model), in answer
        order (or newest first), from answers created in [since, until); forgotten and
        imported conversations and corrected answers excluded. What the post-promotion
        watch compares: a correction is the person teaching something new (no adapter could
        have known it), and a simulated week (benchmarks.week) had each morning's teaching,
        rated 1 and corrected, roll back the champion promoted the night before."""
        check_time("since", since)
        check_time("until", until)
        order = Message.created_at.desc() if newest_first else Message.created_at.asc()
        stmt = (
            select(Feedback.rating)
            .join(Message, Message.id == Feedback.message_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Feedback.is_current,
                Feedback.rating.is_not(None),
                Feedback.correction.is_(None),
                Message.role == "assistant",
                Conversation.forgotten_at.is_(None),
                # Imported answers were written by another model, not by the base model.
                Conversation.source.is_(None),
                Message.adapter_id.is_(None)
                if adapter_id is None
                else Message.adapter_id == adapter_id,
            )
            .order_by(order)
            .limit(max(0, limit))
        )
        if since is not None:
            stmt = stmt.where(Message.created_at >= since)
        if until is not None:
            stmt = stmt.where(Message.created_at < until)
        with self.read_session() as session:
            return [int(r) for r in session.scalars(stmt)]

    # --- status -------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Totals for ``whetstone status``: conversations (not forgotten), forgotten
        conversations, messages, feedback (current items), candidates, and runs by status."""
        with self.read_session() as session:
            runs = dict(
                session.execute(
                    select(TrainingRun.status, func.count()).group_by(TrainingRun.status)
                ).all()
            )
            return {
                "conversations": session.scalar(
                    select(func.count())
                    .select_from(Conversation)
                    .where(Conversation.forgotten_at.is_(None))
                ),
                "forgotten_conversations": session.scalar(
                    select(func.count())
                    .select_from(Conversation)
                    .where(Conversation.forgotten_at.is_not(None))
                ),
                "messages": session.scalar(select(func.count()).select_from(Message)),
                "feedback": session.scalar(
                    select(func.count()).select_from(Feedback).where(Feedback.is_current)
                ),
                "candidates": session.scalar(select(func.count()).select_from(CandidateRecord)),
                "runs": {status: runs.get(status, 0) for status in RUN_STATUSES},
            }
