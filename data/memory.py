"""The memory (issue 37): notes of what the person taught, given to the model from the next
message on, over the Store's sessions (mixed into the Store like TrainingHistory).

A correction stored through add_feedback makes (or, edited, rewrites) the note of its answer:
the question it answered, the answer wanted, the answer's id and the adapter that was wrong.
POST /v1/memory adds one by hand. Forgetting a note leaves a tombstone without its text;
forgetting a conversation deletes its notes.

Retrieval: the notes holding any of the message's content words (stopwords left out,
search.content_words) are found through notes_fts and ranked by bm25(), the note's question
weighted above its text. Whether a note concerns the message at all is its coverage (the
share of the message's content words the note holds), not the bm25 value: FTS5 clamps a
term's idf to ~0 while it is in half the notes or more, so with the first one or two notes
every match scores ~0 and no bm25 threshold tells a relevant note from an unrelated one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from data import search
from data.errors import Gone, InvalidInput, NotFound
from data.models import Message, Note, NoteCheck, new_id, utcnow
from data.validation import check_text

NOTE_MAX_CHARS = 4000  # a note is one fact, given to the model with every relevant message
# How many notes bm25() ranks before coverage picks: the best by coverage is among them.
_CANDIDATES = 20
# The note's question counts for more than its text: a note is found by the question asked
# again; its text may hold words of anything.
_BM25_WEIGHTS = (2.0, 1.0)


@dataclass(frozen=True)
class NoteHit:
    """A note relevant to a message: its coverage of the message's content words (0..1,
    what memory.min_score is compared with) and bm25() (lower is better, as FTS5 gives it)."""

    note: Note
    score: float
    bm25: float


def _check_note_text(name: str, value: Any, *, nullable: bool) -> str | None:
    check_text(name, value, nullable=nullable)
    if value is None:
        return None
    value = value.strip()
    if not value:
        if nullable:
            return None
        raise InvalidInput(f"{name} must not be blank")
    if len(value) > NOTE_MAX_CHARS:
        raise InvalidInput(f"{name} is {len(value)} characters long; at most {NOTE_MAX_CHARS}")
    return value


def question_of(session: Session, answer: Message) -> str | None:
    """The last user turn before `answer`: what a correction of it answers."""
    return session.scalar(
        select(Message.content)
        .where(
            Message.conversation_id == answer.conversation_id,
            Message.role == "user",
            Message.position < answer.position,
        )
        .order_by(Message.position.desc())
        .limit(1)
    )


def note_correction(session: Session, answer: Message, correction: str) -> Note:
    """Make or rewrite the note of a corrected answer, in the feedback's own transaction: an
    edited correction rewrites it (and brings back a forgotten one: it was taught again)."""
    now = utcnow()
    question = question_of(session, answer)
    note = session.scalar(select(Note).where(Note.source_message_id == answer.id))
    if note is None:
        note = Note(
            id=new_id("note"),
            source_message_id=answer.id,
            conversation_id=answer.conversation_id,
            adapter_id=answer.adapter_id,
            created_at=now,
        )
        session.add(note)
    note.question = question
    note.text = correction.strip()
    note.status = "active"
    note.updated_at = now
    return note


class Memory:
    """Notes: made from corrections or by hand, listed, forgotten, found for a message."""

    # The Store's (see TrainingHistory).
    session: Callable[[], AbstractContextManager[Session]]
    read_session: Callable[[], AbstractContextManager[Session]]
    _full_text: bool
    _purge_search_index: Callable[[Session], None]
    _checkpoint: Callable[[], None]

    def add_note(self, note_text: str, *, question: str | None = None) -> Note:
        """A note written by hand (POST /v1/memory). InvalidInput naming `text` or
        `question` for a blank, too long or non-text value."""
        question = _check_note_text("question", question, nullable=True)
        body = _check_note_text("text", note_text, nullable=False)
        with self.session() as session:
            now = utcnow()
            note = Note(
                id=new_id("note"),
                question=question,
                text=body,
                status="active",
                created_at=now,
                updated_at=now,
            )
            session.add(note)
        return note

    def get_note(self, note_id: str) -> Note:
        """NotFound for an unknown id, Gone for a forgotten note."""
        with self.read_session() as session:
            note = session.get(Note, note_id)
            if note is None:
                raise NotFound(f"unknown note {note_id}")
            if note.status == "forgotten":
                raise Gone(f"note {note_id} was forgotten")
        return note

    def list_notes(self, limit: int = 50, offset: int = 0) -> list[Note]:
        """Notes not forgotten (active and learned), newest first."""
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Note)
                    .where(Note.status != "forgotten")
                    .order_by(Note.created_at.desc(), Note.id.desc())
                    .limit(max(0, limit))
                    .offset(max(0, offset))
                )
            )

    def forget_note(self, note_id: str) -> None:
        """Clear the note's question and text (out of notes_fts and, once merged and
        checkpointed, out of the file) and mark it forgotten. Idempotent; NotFound for an id
        never stored."""
        with self.session() as session:
            note = session.get(Note, note_id)
            if note is None:
                raise NotFound(f"unknown note {note_id}")
            if note.status == "forgotten":
                return
            note.question = None
            note.text = ""
            note.status = "forgotten"
            note.updated_at = utcnow()
            session.flush()  # the update trigger takes the words out of the index
            self._purge_search_index(session)
        self._checkpoint()

    @staticmethod
    def _delete_conversation_notes(session: Session, conversation_id: str) -> int:
        """Delete the notes of a conversation being forgotten (its trigger takes each out of
        notes_fts); the caller merges the index."""
        return session.execute(delete(Note).where(Note.conversation_id == conversation_id)).rowcount

    def record_note_checks(self, adapter_id: str, answered_right: dict[str, bool]) -> None:
        """Whether `adapter_id` answered each note's question right without it (note id ->
        verdict), replacing what was recorded for that adapter and note before. Notes
        deleted since are left out."""
        if not answered_right:
            return
        with self.session() as session:
            present = set(session.scalars(select(Note.id).where(Note.id.in_(answered_right))))
            for note_id, right in answered_right.items():
                if note_id in present:
                    session.merge(
                        NoteCheck(
                            note_id=note_id,
                            adapter_id=adapter_id,
                            answered_right=right,
                            checked_at=utcnow(),
                        )
                    )

    def learned_notes(self, adapter_id: str | None) -> set[str]:
        """Ids of the notes `adapter_id` answers right without them (none for the base)."""
        if adapter_id is None:
            return set()
        with self.read_session() as session:
            return set(
                session.scalars(
                    select(NoteCheck.note_id).where(
                        NoteCheck.adapter_id == adapter_id, NoteCheck.answered_right
                    )
                )
            )

    def notes_to_check(self, champion_id: str | None, limit: int) -> list[Note]:
        """The active notes with a question a candidate's evaluation asks, at most `limit`:
        those the champion has not learned first (what the night may have taught), then
        those it has (whether the candidate kept them); newest first within each. A note
        past the limit counts as not learned by the candidate: it stays given to the model."""
        learned = Note.id.in_(
            select(NoteCheck.note_id).where(
                NoteCheck.adapter_id == champion_id, NoteCheck.answered_right
            )
        )
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Note)
                    .where(Note.status == "active", Note.question.is_not(None))
                    .order_by(learned, Note.created_at.desc(), Note.id.desc())
                    .limit(max(0, limit))
                )
            )

    def relevant_notes(
        self,
        message: str,
        *,
        min_score: float,
        limit: int = 5,
        serving_adapter: str | None = None,
    ) -> list[NoteHit]:
        """Active notes concerning `message`, best first: coverage of its content words at
        least `min_score`, bm25() breaking ties; without those `serving_adapter` has learned
        (record_note_checks). Empty without FTS5 (not SQLite) or when the message has no
        content word."""
        words = search.content_words(message)
        if not words or not self._full_text or limit <= 0:
            return []
        query = text(
            f"""
            SELECT n.id, bm25(notes_fts, {_BM25_WEIGHTS[0]}, {_BM25_WEIGHTS[1]}) AS rank
            FROM notes_fts CROSS JOIN notes AS n ON n.rowid = notes_fts.rowid
            WHERE notes_fts MATCH :match AND n.status = 'active'
              AND NOT EXISTS (
                SELECT 1 FROM note_checks AS c
                WHERE c.note_id = n.id AND c.adapter_id = :serving AND c.answered_right
              )
            ORDER BY rank LIMIT :candidates
            """
        )
        with self.read_session() as session:
            ranked = session.execute(
                query,
                {
                    "match": search.note_match(words),
                    "candidates": _CANDIDATES,
                    "serving": serving_adapter,
                },
            ).all()
            if not ranked:
                return []
            notes = {
                n.id: n
                for n in session.scalars(select(Note).where(Note.id.in_([i for i, _ in ranked])))
            }
        hits = []
        for note_id, rank in ranked:
            note = notes[note_id]
            score = search.coverage(words, f"{note.question or ''} {note.text}")
            if score >= min_score:
                hits.append(NoteHit(note, round(score, 4), float(rank)))
        hits.sort(key=lambda hit: (-hit.score, hit.bm25))
        return hits[:limit]
