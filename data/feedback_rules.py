"""What a piece of feedback means, as the store records it.

- A submission is a rating (a whole number 1-5), a correction (the answer the person wanted)
  and/or a comment, on an assistant answer of a conversation not forgotten.
- A new submission carries over what it leaves out from the current one (rating 4, later a
  correction: rating 4 + the correction); the earlier row stays as history.
- The answer is placed into the holdout, validation or training (data/splits.py) when it
  first gets feedback, and placed again when its kind changes while no run has used it.
- The marks a run leaves on answers (used, judged) are set once: the first one stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from data.errors import FeedbackError, FeedbackTargetGone, FeedbackTargetNotFound
from data.models import Conversation, Feedback, Message
from data.splits import placement_kind, spread_placement
from data.validation import unencodable


def check_feedback(rating: Any, correction: Any, comment: Any) -> str | None:
    """Refuse a bad rating, a blank correction, a non-text comment or nothing at all
    (FeedbackError naming the problem); return the comment, None when blank."""
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
    return comment


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


def feedback_target(session: Session, message_id: str) -> Message:
    """The answer feedback is given on: FeedbackTargetNotFound for an unknown message,
    FeedbackTargetGone for one of a forgotten conversation, FeedbackError for a message
    that is not an assistant answer."""
    message = session.get(Message, message_id)
    if message is None:
        raise FeedbackTargetNotFound(
            f"unknown message {message_id} (never stored, or its conversation was forgotten)"
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
    return message


def carried_over(
    previous: Feedback, rating: int | None, correction: str | None, comment: str | None
) -> tuple[int | None, str | None, str | None]:
    """(rating, correction, comment) of a new submission, each left out one taken from the
    current feedback it replaces."""
    return (
        previous.rating if rating is None else rating,
        previous.correction if correction is None else correction,
        previous.comment if comment is None else comment,
    )


def place(session: Session, message: Message, correction: str | None, rating: int | None) -> None:
    """Place the answer by its feedback as it now stands, unless it is placed already as
    that kind, or a run has used it (its placement never changes again)."""
    kind = placement_kind(correction, rating)
    redraw = message.placement_kind not in (None, kind) and message.used_at is None
    if message.placement is None or redraw:
        # Drawn again while no run has used it: an answer rated 1 and then corrected
        # is placed as a correction, whichever came first. (Every placement the store
        # drew has its kind; migration 0004 gave the older ones theirs.)
        ordinal = _free_ordinal(session, kind, message.id)
        message.placement = spread_placement(ordinal)
        message.placement_kind, message.placement_ordinal = kind, ordinal


def place_new(session: Session, answers: Iterable[tuple[Message, int]]) -> None:
    """Place answers that were never placed, each by its rating (imported history: rated or
    kept answers, no corrections), as place() would one by one, but reading each kind's taken
    places once: an import of thousands of rated answers would read them thousands of times."""
    taken: dict[str, set[int]] = {}
    cursor: dict[str, int] = {}
    for message, rating in answers:
        kind = placement_kind(None, rating)
        if kind not in taken:
            taken[kind] = set(
                session.scalars(
                    select(Message.placement_ordinal).where(
                        Message.placement_kind == kind, Message.placement_ordinal.is_not(None)
                    )
                )
            )
            cursor[kind] = 0
        ordinal = cursor[kind]
        while ordinal in taken[kind]:
            ordinal += 1
        taken[kind].add(ordinal)
        cursor[kind] = ordinal + 1
        message.placement = spread_placement(ordinal)
        message.placement_kind, message.placement_ordinal = kind, ordinal


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


def mark_first(session: Session, column: Any, message_ids: Iterable[str], when: datetime) -> int:
    """Set `column` (Message.used_at or .judged_at) to `when` on those of the messages that
    have none; returns how many were marked."""
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
