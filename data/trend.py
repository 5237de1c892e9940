"""How the person's model changed over weeks, read from the store: per day and per serving
adapter the answers, mean rating, share corrected, regenerations and response time (time to
the first token, tokens per second); per day the conversations' length (turns, and tokens
of the longest context an answer was made with); promotions and rollbacks on a timeline;
each champion's evaluation scores at the time it was judged. Imported history (another
model's answers, `whetstone import`) is no part of it.

`development.trend_report` draws these as text (CLI, TUI) and as a self-contained HTML page.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select

from data.models import Conversation, Evaluation, Feedback, Message, Promotion
from data.store import Store

# Evaluation figures followed over time (as the report names them), where a champion has them.
TRACKED = ("holdout_nll", "correction_accuracy", "general_facts", "general_nll")


@dataclass
class DayRow:
    """One day's answers by one adapter (None: the base model)."""

    day: date
    adapter_id: str | None
    answers: int = 0
    rated: int = 0
    rating_sum: int = 0
    corrected: int = 0
    regenerations: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    decode_tokens: int = 0  # tokens after the first, over the time they took
    decode_seconds: float = 0.0

    def add(self, other: DayRow) -> None:
        """Count `other`'s answers in too (another adapter's, the same day)."""
        self.answers += other.answers
        self.rated += other.rated
        self.rating_sum += other.rating_sum
        self.corrected += other.corrected
        self.regenerations += other.regenerations
        self.ttft_ms += other.ttft_ms
        self.decode_tokens += other.decode_tokens
        self.decode_seconds += other.decode_seconds

    @property
    def mean_rating(self) -> float | None:
        return self.rating_sum / self.rated if self.rated else None

    @property
    def median_ttft_s(self) -> float | None:
        return statistics.median(self.ttft_ms) / 1000 if self.ttft_ms else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    @property
    def corrected_share(self) -> float:
        return self.corrected / self.answers if self.answers else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "adapter_id": self.adapter_id,
            "answers": self.answers,
            "mean_rating": None if self.mean_rating is None else round(self.mean_rating, 2),
            "corrected_share": round(self.corrected_share, 3),
            "regenerations": self.regenerations,
            "median_ttft_s": _round(self.median_ttft_s, 3),
            "tokens_per_s": _round(self.tokens_per_s, 1),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class ConversationDay:
    """The conversations whose first answer in the period came on `day`: how long they ran."""

    day: date
    conversations: int = 0
    turns: int = 0  # the person's messages that got an answer
    tokens: int = 0  # per conversation, its longest context: prompt + answer tokens

    def as_dict(self) -> dict[str, Any]:
        n = self.conversations
        return {
            "day": self.day.isoformat(),
            "conversations": n,
            "turns_per_conversation": round(self.turns / n, 2) if n else None,
            "tokens_per_conversation": round(self.tokens / n, 1) if n else None,
        }


@dataclass
class Trend:
    since: datetime
    until: datetime
    days: list[DayRow] = field(default_factory=list)
    conversations: list[ConversationDay] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # promotions and rollbacks
    champions: list[dict[str, Any]] = field(default_factory=list)  # scores when promoted

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "days": [row.as_dict() for row in self.days],
            "conversations": [row.as_dict() for row in self.conversations],
            "events": self.events,
            "champions": self.champions,
        }


def trend(store: Store, weeks: int = 4, now: datetime | None = None) -> Trend:
    """The last `weeks` weeks (up to `now`)."""
    until = now or datetime.now(UTC)
    since = until - timedelta(weeks=weeks)
    result = Trend(since, until)
    with store.read_session() as session:
        answers = session.execute(
            select(Message, Feedback)
            .outerjoin(
                Feedback, (Feedback.message_id == Message.id) & Feedback.is_current.is_(True)
            )
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Message.role == "assistant",
                Message.finish_reason.is_not(None),
                # Imported history (data/imports.py) was answered elsewhere, by another
                # model: it is no day of any adapter here.
                Conversation.source.is_(None),
                Message.created_at >= since,
                Message.created_at <= until,
            )
            .order_by(Message.created_at)
        ).all()
        promotions = session.scalars(
            select(Promotion)
            .where(Promotion.created_at >= since, Promotion.created_at <= until)
            .order_by(Promotion.created_at)
        ).all()
        evaluations = session.scalars(select(Evaluation).order_by(Evaluation.created_at)).all()

    rows: dict[tuple[date, str | None], DayRow] = {}
    seen_prompts: defaultdict[str, int] = defaultdict(int)
    # conversation id -> [day of its first answer here, turns answered, longest context]
    lengths: dict[str, list[Any]] = {}
    for message, feedback in answers:
        day = message.created_at.date()
        row = rows.setdefault((day, message.adapter_id), DayRow(day, message.adapter_id))
        row.answers += 1
        if message.ttft_ms is not None:
            row.ttft_ms.append(message.ttft_ms)
            if message.latency_ms and message.completion_tokens and message.completion_tokens > 1:
                decoding = (message.latency_ms - message.ttft_ms) / 1000
                if decoding > 0:
                    row.decode_tokens += message.completion_tokens - 1
                    row.decode_seconds += decoding
        length = lengths.setdefault(message.conversation_id, [day, set(), 0])
        length[1].add(message.reply_to_id)
        length[2] = max(length[2], (message.prompt_tokens or 0) + (message.completion_tokens or 0))
        if message.reply_to_id is not None:
            seen_prompts[message.reply_to_id] += 1
            if seen_prompts[message.reply_to_id] > 1:  # another answer to the same turn
                row.regenerations += 1
        if feedback is not None:
            if feedback.rating is not None:
                row.rated += 1
                row.rating_sum += feedback.rating
            if feedback.correction is not None:
                row.corrected += 1
    result.days = sorted(rows.values(), key=lambda r: (r.day, r.adapter_id or ""))
    by_start: dict[date, ConversationDay] = {}
    for day, turns, tokens in lengths.values():
        started = by_start.setdefault(day, ConversationDay(day))
        started.conversations += 1
        started.turns += len(turns)
        started.tokens += tokens
    result.conversations = sorted(by_start.values(), key=lambda c: c.day)

    latest: dict[str, Evaluation] = {}
    for evaluation in evaluations:
        latest[evaluation.candidate_id] = evaluation
    for promotion in promotions:
        result.events.append(
            {
                "at": promotion.created_at.isoformat(),
                "action": promotion.action,
                "candidate_id": promotion.candidate_id,
                "previous_id": promotion.previous_id,
                "forced": promotion.forced,
            }
        )
        evaluation = latest.get(promotion.candidate_id or "")
        if promotion.action == "promote" and evaluation is not None:
            scores = (evaluation.metrics or {}).get("candidate") or {}
            result.champions.append(
                {
                    "at": promotion.created_at.isoformat(),
                    "candidate_id": promotion.candidate_id,
                    **{name: scores.get(name) for name in TRACKED if name in scores},
                }
            )
    return result


def by_day(trend: Trend) -> list[dict[str, Any]]:
    """One entry per day: totals over adapters, and the adapter that answered most."""
    totals: dict[date, DayRow] = {}
    served: defaultdict[date, dict[str | None, int]] = defaultdict(dict)
    for row in trend.days:
        totals.setdefault(row.day, DayRow(row.day, None)).add(row)
        served[row.day][row.adapter_id] = row.answers
    return [
        asdict(total)
        | {
            "by_adapter": served[day],
            "adapter_id": max(served[day], key=lambda a: served[day][a]),
            "mean_rating": total.mean_rating,
            "corrected_share": total.corrected_share,
            "median_ttft_s": total.median_ttft_s,
            "tokens_per_s": total.tokens_per_s,
        }
        for day, total in sorted(totals.items())
    ]


def text(trend: Trend) -> str:
    """A table a terminal (or the TUI's status screen) shows as is: per day the answers, mean
    rating, share corrected, regenerations, median time to the first token, tokens per
    second, and the turns and tokens of the conversations started that day (means)."""
    lines = [
        f"{'day':10}  {'answers':>7}  {'rating':>6}  {'corrected':>9}  {'regen':>5}  "
        f"{'1st tok':>7}  {'tok/s':>5}  {'turns':>5}  {'tokens':>6}  serving",
    ]
    started = {c.day: c.as_dict() for c in trend.conversations}

    def shown(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    for day in by_day(trend):
        length = started.get(day["day"], {})
        first = shown(day["median_ttft_s"], ".2f")
        lines.append(
            f"{day['day'].isoformat():10}  {day['answers']:>7}  "
            f"{shown(day['mean_rating'], '.2f'):>6}  "
            f"{day['corrected_share']:>9.0%}  {day['regenerations']:>5}  "
            f"{first + ' s' if first != '-' else first:>7}  "
            f"{shown(day['tokens_per_s'], '.1f'):>5}  "
            f"{shown(length.get('turns_per_conversation'), '.1f'):>5}  "
            f"{shown(length.get('tokens_per_conversation'), '.0f'):>6}  "
            f"{day['adapter_id'] or 'base model'}"
        )
    if len(lines) == 1:
        lines.append("(no answers in this period)")
    for event in trend.events:
        what = {"promote": "promoted", "rollback": "rolled back", "auto_rollback": "auto rollback"}
        target = event["candidate_id"] or "the base model"
        when = event["at"][:16].replace("T", " ")
        lines.append(f"{when}  {what.get(event['action'], event['action'])} -> {target}")
    for champion in trend.champions:
        scores = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in champion.items()
            if k not in ("at", "candidate_id") and v is not None
        )
        lines.append(f"champion {champion['candidate_id']}: {scores or 'no scores'}")
    return "\n".join(lines)
