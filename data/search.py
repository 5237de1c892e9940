"""History search: the person's words as an FTS5 query over the full-text indexes of
messages and titles (migration 0005, kept in step by triggers), the page of conversations
that hold them, each with a snippet of what matched; a LIKE scan where there is no FTS5
(a database other than SQLite). Store.search_conversations runs these in its read session.

Also the memory's retrieval (migration 0007): the notes relevant to a chat message, found
by the message's content words (stopwords left out) through notes_fts, ranked by bm25().
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, bindparam, exists, or_, select, text
from sqlalchemy.orm import Session

from data.errors import InvalidInput
from data.models import CONVERSATIONS_LISTED, Conversation, Message
from data.validation import unencodable

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


# Words that say nothing about what a message is about: "What is my cat's name?" must find
# the note about the cat, not every note holding "what", "is" or "my". Short English function
# words, question words and the pronouns a person uses of themselves and of the model.
_STOPWORD_TEXT = """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing done down during each else few for
    from further get got had has have having he her here hers herself him himself his how i if
    in into is it its itself just know let like me might more most much must my myself no nor
    not now of off on once only or other our ours ourselves out over own please same shall she
    should so some such tell than that the their theirs them themselves then there these they
    this those through to too under until up very want was we were what when where which while
    who whom whose why will with would you your yours yourself yourselves s t d ll m re ve
    also ever really
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
NOTE_QUERY_MAX_WORDS = 32  # a long message is searched by its first content words


def content_words(text: str) -> list[str]:
    """The words of `text` that say what it is about, lowercased, accents folded, each once,
    in order: split where notes_fts's tokenizer splits (anything not a letter or a digit),
    stopwords left out."""
    folded = "".join(
        ch for ch in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(ch)
    )
    words: list[str] = []
    current: list[str] = []
    for ch in folded + " ":
        if ch.isalnum():
            current.append(ch)
            continue
        if current:
            word = "".join(current)
            if word not in STOPWORDS and word not in words:
                words.append(word)
            current = []
    return words


def note_match(words: list[str]) -> str:
    """An FTS5 query finding notes that hold any of `words` (content_words of a message),
    each quoted as in fts_query, a word of 3 or more letters also the start of a longer one
    ("cat" finds "cats")."""
    return " OR ".join(fts_query([word], prefix=True) for word in words[:NOTE_QUERY_MAX_WORDS])


def coverage(words: list[str], note_text: str) -> float:
    """The share of `words` (a message's content words) that the note's text holds, a word
    of 3 or more letters also as the start of a longer one: what decides whether a note
    concerns the message (bm25() only ranks: see data/memory.py)."""
    if not words:
        return 0.0
    held = content_words(note_text)
    found = sum(
        1
        for word in words
        if any(h == word or (len(word) >= _PREFIX_MIN_CHARS and h.startswith(word)) for h in held)
    )
    return found / len(words)


def has_full_text(engine: Engine) -> bool:
    """Whether the database has the full-text indexes (SQLite at 0005 or later)."""
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as connection:
        found = connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages_fts'"
        ).first()
    return found is not None


def search_full_text(
    session: Session, words: list[str], limit: int, offset: int, *, prefix: bool
) -> list[SearchHit]:
    """One page of conversations holding every word, through the FTS5 indexes."""
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
    rows = session.execute(page, params).all()
    if not rows:
        return []
    ids = [conversation_id for conversation_id, _ in rows]
    found = {c.id: c for c in session.scalars(select(Conversation).where(Conversation.id.in_(ids)))}
    snippets = _snippets(session, match, rows)
    return [SearchHit(found[i], *snippets.get(i, ("", []))) for i in ids if i in found]


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
        for rowid, snippet in session.execute(messages, {"match": match, "rowids": list(by_rowid)}):
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
        for conversation_id, snippet in session.execute(titles, {"match": match, "ids": titled}):
            found[conversation_id] = _marked(snippet)
    return found


def search_like(session: Session, words: list[str], limit: int, offset: int) -> list[SearchHit]:
    """Search without FTS5 (a database other than SQLite): every word as a substring of
    one message or of the title, case ignored; the snippet is the text around the first
    word. Slower, and no accent folding, but the same answers for plain words."""

    def holds(column: Any) -> Any:
        escaped = [w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in words]
        return and_(*(column.ilike(f"%{w}%", escape="\\") for w in escaped))

    in_message = exists().where(
        Message.conversation_id == Conversation.id,
        Message.role.in_(_SEARCHED_ROLES),
        holds(Message.content),
    )
    stmt = (
        select(Conversation)
        .where(Conversation.forgotten_at.is_(None), or_(in_message, holds(Conversation.title)))
        .order_by(*CONVERSATIONS_LISTED)
        .limit(limit)
        .offset(offset)
    )
    first = words[0].lower()
    hits = []
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


def purge_index(session: Session) -> None:
    """Merge the full-text indexes' segments. Deleting from FTS5 only records that the
    rows are gone; their words stay in the older segments (in the file) until those are
    merged. 'optimize' merges them all, leaving the forgotten words nowhere; the pages it
    frees are zeroed (secure_delete). (FTS5's own secure-delete option would spare the
    merge, but needs SQLite 3.42 and makes the file unreadable to older ones.)"""
    present = set(
        session.scalars(
            text("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%_fts'")
        )
    )
    # notes_fts is 0007's: a store opened without migrating may be older.
    for fts in ("messages_fts", "conversations_fts", "notes_fts"):
        if fts in present:
            session.execute(text(f"INSERT INTO {fts}({fts}) VALUES ('optimize')"))


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
