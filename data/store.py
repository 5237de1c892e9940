"""The store: conversations, feedback and the training/promotion history, over SQLAlchemy.

Every method opens and closes its own short session and returns ORM objects loaded with
``expire_on_commit=False``: their columns stay readable after the session is gone.
Relationships are ``lazy="raise"``; the methods that return them say so and load them.

One module on purpose: the store's whole query API over one session discipline (the ORM
models are in models.py, the schema in migrations/).
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, or_, select, text, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from data import db
from data.errors import (
    FeedbackError,
    FeedbackTargetGone,
    FeedbackTargetNotFound,
    Gone,
    InvalidInput,
    NotFound,
)
from data.models import (
    EVAL_DECISIONS,
    FINISH_REASONS,
    PROMOTION_ACTIONS,
    REASONING_EFFORTS,
    ROLES,
    RUN_FINISHED,
    RUN_STATUSES,
    CandidateRecord,
    Conversation,
    Evaluation,
    Feedback,
    Message,
    Promotion,
    TrainingRun,
    new_id,
    utcnow,
)
from data.splits import placement_kind, spread_placement

log = logging.getLogger(__name__)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "leave as is", where None means "clear"

_MESSAGE_FIELDS = frozenset(
    {
        "reasoning",
        "reply_to_id",
        "adapter_id",
        "base_model",
        "generation",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "ttft_ms",
        "finish_reason",
        "created_at",
        "completed_at",
        "tool_calls",
        "tool_call_id",
    }
)
_COMPLETE_FIELDS = _MESSAGE_FIELDS - {"reply_to_id", "finish_reason", "created_at"}
_RUN_FIELDS = frozenset(
    {
        "status",
        "profile",
        "reason",
        "error",
        "candidate_id",
        "data_snapshot",
        "progress",
        "pid",
        "started_at",
        "finished_at",
    }
)
_CANDIDATE_FIELDS = frozenset({"status", "metrics", "parent_id", "run_id", "base_model"})


# --- validation -------------------------------------------------------------------------


def _choice(name: str, value: Any, choices: Iterable[str], *, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    choices = tuple(choices)
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _text(name: str, value: Any, *, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string; got {type(value).__name__}")
    unencodable(name, value)


def unencodable(name: str, value: str) -> None:
    """Refuse text that UTF-8 cannot store: a lone surrogate (JSON allows "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise InvalidInput(
            f"{name} is not valid text: a lone surrogate U+{ord(bad):04X} at character "
            f"{exc.start} (escape pairs must be complete)"
        ) from None


def _number(name: str, value: Any, *, integer: bool) -> None:
    if value is None:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    # bool is an int subclass; True tokens is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "integer" if integer else "number"
        raise InvalidInput(f"{name} must be a non-negative {kind} or null; got {value!r}")


def _time(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime; got {value!r}")


def _json_object(name: str, value: Any, *, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{name} must be a JSON object (dict); got {type(value).__name__}")


def _unknown_fields(fields: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown {what} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _check_message_fields(fields: Mapping[str, Any]) -> None:
    for name in ("reasoning", "adapter_id", "base_model"):
        _text(name, fields.get(name))
    for name in ("prompt_tokens", "completion_tokens"):
        _number(name, fields.get(name), integer=True)
    for name in ("latency_ms", "ttft_ms"):
        _number(name, fields.get(name), integer=False)
    for name in ("created_at", "completed_at"):
        _time(name, fields.get(name))
    _choice("finish_reason", fields.get("finish_reason"), FINISH_REASONS)
    _text("tool_call_id", fields.get("tool_call_id"))
    calls = fields.get("tool_calls")
    if calls is not None and (
        not isinstance(calls, list)
        or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
    ):
        raise InvalidInput("tool_calls must be a list of {id, type, function: {name, arguments}}")
    generation = fields.get("generation")
    _json_object("generation", generation)
    if generation is not None:
        effort = generation.get("reasoning_effort")
        _choice("generation.reasoning_effort", effort, REASONING_EFFORTS)


def _check_rating(rating: Any) -> None:
    if rating is None:
        return
    # Exactly int: True would pass isinstance(int) and 4.5 or "4" are client bugs to surface.
    if type(rating) is not int or not 1 <= rating <= 5:
        raise FeedbackError(
            f"rating must be a whole number from 1 to 5; got {rating!r} ({type(rating).__name__})"
        )


def _check_correction(correction: Any) -> None:
    if correction is None:
        return
    if not isinstance(correction, str):
        raise FeedbackError(f"correction must be a string; got {type(correction).__name__}")
    unencodable("correction", correction)
    if not correction.strip():
        raise FeedbackError(
            "correction is empty; send the answer you wanted, or leave correction out"
        )


# --- search -----------------------------------------------------------------------------

SEARCH_MAX_CHARS = 200
SEARCH_MAX_WORDS = 16
# A word of the query matches the start of a word ("owl" finds "owls"; search as you type)
# from this many characters on; shorter ones match whole words: "a"* would match most of
# the history, and slowly.
_PREFIX_MIN_CHARS = 3
# Where snippet() marks a match; control characters a message hardly ever holds.
_MARK_START, _MARK_END = "\x02", "\x03"
_SNIPPET_TOKENS = 12
_SEARCHED_ROLES = ("user", "assistant")  # not tool output, not system prompts


@dataclass(frozen=True)
class SearchHit:
    """A conversation found by a search, with a short excerpt of what matched: the newest
    matching message, else the title. ``highlights`` are [start, end) character offsets of
    the matched words in ``snippet``."""

    conversation: Conversation
    snippet: str
    highlights: list[tuple[int, int]] = field(default_factory=list)


def search_words(q: Any) -> list[str]:
    """The person's query as plain words (split on whitespace; a word needs a letter or a
    digit). InvalidInput naming ``q`` for a blank, too long or non-text query."""
    if not isinstance(q, str):
        raise InvalidInput(f"q must be a string; got {type(q).__name__}")
    unencodable("q", q)
    if len(q) > SEARCH_MAX_CHARS:
        raise InvalidInput(f"q is {len(q)} characters long; at most {SEARCH_MAX_CHARS}")
    # Control characters separate words too: FTS5 refuses a NUL even inside a quoted word.
    spaced = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in q)
    words = [w for w in spaced.split() if any(ch.isalnum() for ch in w)]
    if not words:
        raise InvalidInput("q has no words to search for (letters or digits); got " + repr(q))
    if len(words) > SEARCH_MAX_WORDS:
        raise InvalidInput(f"q has {len(words)} words; at most {SEARCH_MAX_WORDS}")
    return words


def fts_query(words: list[str], *, prefix: bool) -> str:
    """An FTS5 query that finds rows holding every word, in any order.

    Each word is quoted (a quote inside doubled), so nothing the person types is FTS syntax:
    AND, OR, NOT, NEAR(, *, ^, column: and quotes are only text. A quoted word the tokenizer
    splits ("don't", "e-mail") is a phrase: its parts next to each other."""
    terms = []
    for word in words:
        term = '"' + word.replace('"', '""') + '"'
        if prefix and sum(ch.isalnum() for ch in word) >= _PREFIX_MIN_CHARS:
            term += "*"  # outside the quotes: FTS5's prefix mark, on the quoted word
        terms.append(term)
    return " ".join(terms)


def _marked(snippet: str) -> tuple[str, list[tuple[int, int]]]:
    """A snippet with its match markers taken out (as offsets) and runs of whitespace (the
    newlines of a message) made one space, so it fits on a line."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for ch in snippet:
        if ch == _MARK_START:
            start = len(out)
        elif ch == _MARK_END:
            if start is not None:
                spans.append((start, len(out)))
            start = None
        elif ch.isspace():
            if out and out[-1] != " ":
                out.append(" ")
        else:
            out.append(ch)
    if out and out[-1] == " ":
        out.pop()
    return "".join(out), spans


class Store:
    """The whetstone database. ``Store(url)`` opens it and migrates it to the newest schema.

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
        _text("system_prompt", system_prompt)
        _text("title", title)
        _choice("reasoning_effort", reasoning_effort, REASONING_EFFORTS)
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

    # Newest first; the id breaks ties in the same direction, so ix_conversations_listed
    # (updated_at, id; not forgotten) read backwards gives the order without a sort.
    _LISTED_ORDER = (Conversation.updated_at.desc(), Conversation.id.desc())

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[Conversation]:
        """Conversations not forgotten, most recently updated first, each with
        ``.message_count`` (messages are not loaded)."""
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Conversation)
                    .where(Conversation.forgotten_at.is_(None))
                    .order_by(*self._LISTED_ORDER)
                    .limit(max(0, limit))
                    .offset(max(0, offset))
                )
            )

    @cached_property
    def _full_text(self) -> bool:
        """Whether the database has the full-text indexes (SQLite at 0005 or later)."""
        if self.engine.dialect.name != "sqlite":
            return False
        with self.engine.connect() as connection:
            found = connection.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages_fts'"
            ).first()
        return found is not None

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
        words = search_words(q)
        limit, offset = max(0, limit), max(0, offset)
        if not self._full_text:
            return self._search_like(words, limit, offset)
        match = fts_query(words, prefix=prefix)
        # One pass over the matches: each matching message (user or assistant) and title
        # gives its conversation; each conversation keeps its newest matching message (the
        # highest rowid: a conversation's messages are appended), NULL if only the title
        # matched. The page is cut in the list's order. CROSS JOIN keeps the index the outer
        # loop: it is walked once, and asking it about one row at a time instead costs a
        # merge of every word a prefix ("the"*) stands for, per row.
        page = text(
            """
            WITH hits(conversation_id, message_rowid) AS (
                SELECT m.conversation_id, messages_fts.rowid FROM messages_fts
                CROSS JOIN messages AS m ON m.rowid = messages_fts.rowid
                WHERE messages_fts MATCH :match AND m.role IN :roles
                UNION ALL
                SELECT c.id, NULL FROM conversations_fts
                CROSS JOIN conversations AS c ON c.rowid = conversations_fts.rowid
                WHERE conversations_fts MATCH :match
            ), found(conversation_id, message_rowid) AS (
                SELECT conversation_id, max(message_rowid) FROM hits GROUP BY conversation_id
            )
            SELECT c.id, found.message_rowid FROM found
            JOIN conversations AS c ON c.id = found.conversation_id
            WHERE c.forgotten_at IS NULL
            ORDER BY c.updated_at DESC, c.id DESC LIMIT :limit OFFSET :offset
            """
        ).bindparams(bindparam("roles", expanding=True))
        params = {"match": match, "roles": _SEARCHED_ROLES, "limit": limit, "offset": offset}
        with self.read_session() as session:
            rows = session.execute(page, params).all()
            if not rows:
                return []
            ids = [conversation_id for conversation_id, _ in rows]
            found = {
                c.id: c
                for c in session.scalars(select(Conversation).where(Conversation.id.in_(ids)))
            }
            snippets = self._snippets(session, match, rows)
        return [SearchHit(found[i], *snippets.get(i, ("", []))) for i in ids if i in found]

    @staticmethod
    def _snippets(
        session: Session, match: str, rows: list[Any]
    ) -> dict[str, tuple[str, list[tuple[int, int]]]]:
        """conversation id -> the snippet of its newest matching message, else of its title,
        for the (conversation id, message rowid or None) rows of one page."""
        by_rowid = {rowid: cid for cid, rowid in rows if rowid is not None}
        titled = [cid for cid, rowid in rows if rowid is None]
        found: dict[str, tuple[str, list[tuple[int, int]]]] = {}
        if by_rowid:
            # "+rowid": a filter on one walk of the index, not one lookup per row (above).
            messages = text(
                f"""
                SELECT rowid, snippet(messages_fts, 0, char(2), char(3), '…', {_SNIPPET_TOKENS})
                FROM messages_fts WHERE messages_fts MATCH :match AND +rowid IN :rowids
                """
            ).bindparams(bindparam("rowids", expanding=True))
            for rowid, snippet in session.execute(
                messages, {"match": match, "rowids": list(by_rowid)}
            ):
                found[by_rowid[rowid]] = _marked(snippet)
        if titled:
            titles = text(
                """
                SELECT c.id, highlight(conversations_fts, 0, char(2), char(3))
                FROM conversations AS c CROSS JOIN conversations_fts
                     ON conversations_fts.rowid = c.rowid
                WHERE c.id IN :ids AND conversations_fts MATCH :match
                """
            ).bindparams(bindparam("ids", expanding=True))
            for conversation_id, snippet in session.execute(
                titles, {"match": match, "ids": titled}
            ):
                found[conversation_id] = _marked(snippet)
        return found

    def _search_like(self, words: list[str], limit: int, offset: int) -> list[SearchHit]:
        """Search without FTS5 (a database other than SQLite): every word as a substring of
        one message or of the title, case ignored; the snippet is the text around the first
        word. Slower, and no accent folding, but the same answers for plain words."""

        def holds(column: Any) -> Any:
            escaped = [
                w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in words
            ]
            return and_(*(column.ilike(f"%{w}%", escape="\\") for w in escaped))

        in_message = exists().where(
            Message.conversation_id == Conversation.id,
            Message.role.in_(_SEARCHED_ROLES),
            holds(Message.content),
        )
        stmt = (
            select(Conversation)
            .where(Conversation.forgotten_at.is_(None), or_(in_message, holds(Conversation.title)))
            .order_by(*self._LISTED_ORDER)
            .limit(limit)
            .offset(offset)
        )
        first = words[0].lower()
        hits = []
        with self.read_session() as session:
            for conversation in session.scalars(stmt):
                content = session.scalar(
                    select(Message.content)
                    .where(
                        Message.conversation_id == conversation.id,
                        Message.role.in_(_SEARCHED_ROLES),
                        holds(Message.content),
                    )
                    .order_by(Message.position.desc())
                    .limit(1)
                )
                source = content if content is not None else conversation.title or ""
                at = max(0, source.lower().find(first))
                start = max(0, at - 40)
                snippet, spans = _marked(
                    ("…" if start else "")
                    + source[start:at]
                    + _MARK_START
                    + source[at : at + len(first)]
                    + _MARK_END
                    + source[at + len(first) : at + len(first) + 60]
                )
                hits.append(SearchHit(conversation, snippet, spans))
        return hits

    def rename_conversation(self, conversation_id: str, title: str | None) -> Conversation:
        """Set the title (blank or None clears it). Does not change updated_at."""
        _text("title", title)
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
            _text("system_prompt", system_prompt)
        if reasoning_effort is not UNSET:
            _choice("reasoning_effort", reasoning_effort, REASONING_EFFORTS)
        with self.session() as session:
            conversation = self._conversation(session, conversation_id)
            if system_prompt is not UNSET:
                conversation.system_prompt = system_prompt
            if reasoning_effort is not UNSET:
                conversation.reasoning_effort = reasoning_effort
        return conversation

    def forget_conversation(self, conversation_id: str) -> None:
        """Delete the conversation's messages and feedback; keep a tombstone row.

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
            conversation.forgotten_at = utcnow()
            conversation.title = None
            conversation.system_prompt = None
            session.flush()  # the title's trigger takes it out of the index
            self._purge_search_index(session)
        self._checkpoint()
        log.info(
            "forgot conversation %s (%d messages, %d feedback rows deleted)",
            conversation_id,
            message_rows,
            feedback_rows,
        )

    def _purge_search_index(self, session: Session) -> None:
        """Merge the full-text indexes' segments. Deleting from FTS5 only records that the
        rows are gone; their words stay in the older segments (in the file) until those are
        merged. 'optimize' merges them all, leaving the forgotten words nowhere; the pages it
        frees are zeroed (secure_delete). (FTS5's own secure-delete option would spare the
        merge, but needs SQLite 3.42 and makes the file unreadable to older ones.)"""
        if not self._full_text:
            return
        for fts in ("messages_fts", "conversations_fts"):
            session.execute(text(f"INSERT INTO {fts}({fts}) VALUES ('optimize')"))

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
        _choice("role", role, ROLES, nullable=False)
        _text("content", content, nullable=False)
        _unknown_fields(fields, _MESSAGE_FIELDS, "message")
        _check_message_fields(fields)
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
        _text("content", content, nullable=False)
        _choice("finish_reason", finish_reason, FINISH_REASONS, nullable=False)
        _unknown_fields(fields, _COMPLETE_FIELDS, "message completion")
        _check_message_fields(fields)
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
        _text("content", content, nullable=False)
        _text("reasoning", reasoning)
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
        Raises FeedbackError (a ValueError) naming the problem, and changes nothing, for a
        bad rating, a blank correction, nothing given, an unknown message (also a NotFound),
        a non-assistant message, or a forgotten conversation (also a Gone).
        """
        _check_rating(rating)
        _check_correction(correction)
        if comment is not None and not isinstance(comment, str):
            raise FeedbackError(f"comment must be a string; got {type(comment).__name__}")
        if comment is not None:
            unencodable("comment", comment)
        if comment is not None and not comment.strip():
            comment = None
        if rating is None and correction is None and comment is None:
            raise FeedbackError("no feedback given: send a rating (1-5), a correction, or both")

        with self.session() as session:
            message = session.get(Message, message_id)
            if message is None:
                raise FeedbackTargetNotFound(
                    f"unknown message {message_id} "
                    "(never stored, or its conversation was forgotten)"
                )
            conversation = session.get(Conversation, message.conversation_id)
            if conversation is None or conversation.forgotten_at is not None:
                raise FeedbackTargetGone(
                    f"conversation {message.conversation_id} of message {message_id} was forgotten"
                )
            if message.role != "assistant":
                raise FeedbackError(
                    "corrections and ratings apply to assistant answers; "
                    f"{message_id} is a {message.role} message"
                )
            previous = session.scalar(
                select(Feedback).where(Feedback.message_id == message_id, Feedback.is_current)
            )
            if previous is not None:
                rating = previous.rating if rating is None else rating
                correction = previous.correction if correction is None else correction
                comment = previous.comment if comment is None else comment
                # Flip before inserting: the partial unique index allows one current row.
                session.execute(
                    update(Feedback)
                    .where(Feedback.message_id == message_id, Feedback.is_current)
                    .values(is_current=False)
                )
            kind = placement_kind(correction, rating)
            redraw = message.placement_kind not in (None, kind) and message.used_at is None
            if message.placement is None or redraw:
                # Drawn again while no run has used it: an answer rated 1 and then corrected
                # is placed as a correction, whichever came first. (Every placement the store
                # drew has its kind; migration 0004 gave the older ones theirs.)
                ordinal = self._free_ordinal(session, kind, message_id)
                message.placement = spread_placement(ordinal)
                message.placement_kind, message.placement_ordinal = kind, ordinal
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
        log.debug("feedback %s on %s: rating=%s", feedback.id, message_id, feedback.rating)
        return feedback

    @staticmethod
    def _free_ordinal(session: Session, kind: str, message_id: str) -> int:
        """The first place in `kind`'s placement sequence no other answer holds: each kind
        follows its own sequence, so each splits evenly, and a place left by an answer whose
        kind changed before any run used it is taken by the next answer of that kind."""
        taken = set(
            session.scalars(
                select(Message.placement_ordinal).where(
                    Message.placement_kind == kind,
                    Message.placement_ordinal.is_not(None),
                    Message.id != message_id,
                )
            )
        )
        ordinal = 0
        while ordinal in taken:
            ordinal += 1
        return ordinal

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
            return self._mark_in(session, Message.used_at, message_ids, utcnow())

    def freeze_placements(self) -> set[str]:
        """Mark every answer placed so far as used (a training run starts reading them) and
        return their ids: a correction arriving later cannot move any of them."""
        with self.session() as session:
            placed = list(session.scalars(select(Message.id).where(Message.placement.is_not(None))))
            self._mark_in(session, Message.used_at, placed, utcnow())
        return set(placed)

    @staticmethod
    def _mark_in(session: Session, column: Any, message_ids: Iterable[str], when: datetime) -> int:
        # The first mark stays: when an answer was first used or judged.
        ids = sorted(set(message_ids))
        marked = 0
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            result = session.execute(
                update(Message)
                .where(Message.id.in_(ids[start : start + 500]), column.is_(None))
                .values({column.key: when})
            )
            marked += result.rowcount or 0
        return marked

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
        _time("since", since)
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
        order (or newest first), from answers created in [since, until); forgotten
        conversations and corrected answers excluded. What the post-promotion watch compares:
        a correction is the person teaching something new (no adapter could have known it),
        and a simulated week (benchmarks.week) had each morning's teaching, rated 1 and
        corrected, roll back the champion promoted the night before."""
        _time("since", since)
        _time("until", until)
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

    # --- training runs ------------------------------------------------------------------

    def create_run(
        self, profile: str, trigger: str, *, data_snapshot: dict[str, Any] | None = None
    ) -> TrainingRun:
        """A new queued run (id ``run_...``); trigger is free text (manual, nightly, ...)."""
        _text("profile", profile, nullable=False)
        _text("trigger", trigger, nullable=False)
        _json_object("data_snapshot", data_snapshot)
        with self.session() as session:
            run = TrainingRun(
                id=new_id("run"),
                status="queued",
                profile=profile,
                trigger=trigger,
                data_snapshot=dict(data_snapshot or {}),
                progress={},
                created_at=utcnow(),
            )
            session.add(run)
        return run

    def update_run(self, run_id: str, **fields: Any) -> TrainingRun:
        """Set any of status, profile, reason, error, candidate_id, data_snapshot, progress,
        pid, started_at, finished_at. Moving to running sets started_at, and to a finished
        status (succeeded/failed/skipped/cancelled) sets finished_at, unless given."""
        _unknown_fields(fields, _RUN_FIELDS, "training run")
        if "status" in fields:
            _choice("status", fields["status"], RUN_STATUSES, nullable=False)
        for name in ("profile",):
            if name in fields:
                _text(name, fields[name], nullable=False)
        for name in ("reason", "error", "candidate_id"):
            _text(name, fields.get(name))
        for name in ("data_snapshot", "progress"):
            if name in fields:
                _json_object(name, fields[name], nullable=False)
        _number("pid", fields.get("pid"), integer=True)
        for name in ("started_at", "finished_at"):
            _time(name, fields.get(name))
        with self.session() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise NotFound(f"unknown training run {run_id}")
            status = fields.get("status")
            now = utcnow()
            if status == "running" and run.started_at is None:
                fields.setdefault("started_at", now)
            if status in RUN_FINISHED and run.finished_at is None:
                fields.setdefault("finished_at", now)
            for name, value in fields.items():
                # Copy JSON values: the ORM only sees a change when a new object is assigned.
                setattr(run, name, dict(value) if isinstance(value, Mapping) else value)
        return run

    def get_run(self, run_id: str) -> TrainingRun:
        """One training run; NotFound if unknown."""
        with self.read_session() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise NotFound(f"unknown training run {run_id}")
            return run

    def list_runs(
        self, limit: int = 20, *, status: str | None = None, except_trigger: str | None = None
    ) -> list[TrainingRun]:
        """Runs, newest first, optionally only those with ``status`` and not started by
        ``except_trigger``."""
        _choice("status", status, RUN_STATUSES)
        stmt = select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(max(0, limit))
        if status is not None:
            stmt = stmt.where(TrainingRun.status == status)
        if except_trigger is not None:
            stmt = stmt.where(TrainingRun.trigger != except_trigger)
        with self.read_session() as session:
            return list(session.scalars(stmt))

    def latest_run(
        self, status: str | None = None, *, except_trigger: str | None = None
    ) -> TrainingRun | None:
        """The newest run (with ``status`` if given, not by ``except_trigger``), or None."""
        runs = self.list_runs(1, status=status, except_trigger=except_trigger)
        return runs[0] if runs else None

    # --- candidates, evaluations, promotions --------------------------------------------

    def record_candidate(
        self,
        candidate_id: str,
        *,
        base_model: str,
        run_id: str | None = None,
        parent_id: str | None = None,
        status: str = "trained",
        metrics: dict[str, Any] | None = None,
    ) -> CandidateRecord:
        """Record a candidate adapter; the id is its folder name under <home>/candidates/."""
        _text("candidate_id", candidate_id, nullable=False)
        if not candidate_id.strip():
            raise InvalidInput("candidate_id is empty")
        _text("base_model", base_model, nullable=False)
        _text("parent_id", parent_id)
        _text("status", status, nullable=False)
        _json_object("metrics", metrics)
        with self.session() as session:
            if session.get(CandidateRecord, candidate_id) is not None:
                raise InvalidInput(f"candidate {candidate_id} is already recorded")
            if run_id is not None and session.get(TrainingRun, run_id) is None:
                raise InvalidInput(f"unknown training run {run_id} for candidate {candidate_id}")
            candidate = CandidateRecord(
                id=candidate_id,
                run_id=run_id,
                base_model=base_model,
                parent_id=parent_id,
                status=status,
                metrics=dict(metrics or {}),
                created_at=utcnow(),
            )
            session.add(candidate)
        return candidate

    def get_candidate_record(self, candidate_id: str) -> CandidateRecord:
        """One candidate record; NotFound if unknown."""
        with self.read_session() as session:
            candidate = session.get(CandidateRecord, candidate_id)
            if candidate is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            return candidate

    def update_candidate(self, candidate_id: str, **fields: Any) -> CandidateRecord:
        """Set any of status, metrics, parent_id, run_id, base_model."""
        _unknown_fields(fields, _CANDIDATE_FIELDS, "candidate")
        for name in ("status", "base_model"):
            if name in fields:
                _text(name, fields[name], nullable=False)
        _text("parent_id", fields.get("parent_id"))
        if "metrics" in fields:
            _json_object("metrics", fields["metrics"], nullable=False)
        with self.session() as session:
            candidate = session.get(CandidateRecord, candidate_id)
            if candidate is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            run_id = fields.get("run_id")
            if run_id is not None and session.get(TrainingRun, run_id) is None:
                raise InvalidInput(f"unknown training run {run_id} for candidate {candidate_id}")
            for name, value in fields.items():
                setattr(candidate, name, dict(value) if isinstance(value, Mapping) else value)
        return candidate

    def record_evaluation(
        self,
        candidate_id: str,
        *,
        decision: str,
        rule: str,
        metrics: dict[str, Any] | None = None,
        champion_id: str | None = None,
        report_path: str | None = None,
        judged_message_ids: Iterable[str] = (),
    ) -> Evaluation:
        """Record an evaluation of a candidate against champion_id (None: the base model)
        and the gate's decision (promote/reject) with the rule that decided it. The held-out
        answers it judged on (`judged_message_ids`) are marked judged in the same transaction:
        later runs train on them (the rolling holdout, data/splits.py)."""
        _text("candidate_id", candidate_id, nullable=False)
        _choice("decision", decision, EVAL_DECISIONS, nullable=False)
        _text("rule", rule, nullable=False)
        _json_object("metrics", metrics)
        _text("champion_id", champion_id)
        report_path = None if report_path is None else str(report_path)
        with self.session() as session:
            evaluation = Evaluation(
                id=new_id("eval"),
                candidate_id=candidate_id,
                champion_id=champion_id,
                metrics=dict(metrics or {}),
                decision=decision,
                rule=rule,
                report_path=report_path,
                created_at=utcnow(),
            )
            session.add(evaluation)
            self._mark_in(session, Message.judged_at, judged_message_ids, evaluation.created_at)
        return evaluation

    def list_evaluations(
        self, candidate_id: str | None = None, *, limit: int = 100
    ) -> list[Evaluation]:
        """Evaluations (of one candidate if given), newest first."""
        stmt = select(Evaluation).order_by(Evaluation.created_at.desc()).limit(max(0, limit))
        if candidate_id is not None:
            stmt = stmt.where(Evaluation.candidate_id == candidate_id)
        with self.read_session() as session:
            return list(session.scalars(stmt))

    def record_promotion(
        self,
        action: str,
        candidate_id: str | None,
        previous_id: str | None = None,
        *,
        forced: bool = False,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Promotion:
        """Append to the promotion audit log: action promote/rollback/auto_rollback,
        candidate_id = what became current (None: the base model), previous_id = what was."""
        _choice("action", action, PROMOTION_ACTIONS, nullable=False)
        for name, value in (
            ("candidate_id", candidate_id),
            ("previous_id", previous_id),
            ("reason", reason),
            ("actor", actor),
        ):
            _text(name, value)
        if not isinstance(forced, bool):
            raise InvalidInput(f"forced must be true or false; got {forced!r}")
        with self.session() as session:
            promotion = Promotion(
                id=new_id("promo"),
                action=action,
                candidate_id=candidate_id,
                previous_id=previous_id,
                forced=forced,
                reason=reason,
                actor=actor,
                created_at=utcnow(),
            )
            session.add(promotion)
        return promotion

    def list_promotions(self, limit: int = 50) -> list[Promotion]:
        """The promotion audit log, newest first."""
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Promotion).order_by(Promotion.created_at.desc()).limit(max(0, limit))
                )
            )

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
