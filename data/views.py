"""Store rows as JSON-ready dicts: the one shape of each that `whetstone status --json` and
the API worker's bodies show. Timestamps are ISO 8601 strings (datetime.isoformat)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from data.models import Conversation, Feedback, Message, Note, Promotion, TrainingRun

if TYPE_CHECKING:
    from data.search import SearchHit


def run_view(run: TrainingRun) -> dict[str, Any]:
    """A training run: what it is, how it ended, how far it got."""
    return {
        k: getattr(run, k)
        for k in ("id", "status", "profile", "trigger", "reason", "error", "candidate_id")
    } | {"created_at": run.created_at.isoformat(), "progress": run.progress}


def run_outcome(store: Any, run: TrainingRun) -> dict[str, Any]:
    """A run that ended, with how its candidate was judged, whether it serves now and what to
    do next: what /v1/status shows as `last_run` and the daemon logs when the run ends."""
    view = {k: v for k, v in run_view(run).items() if k != "progress"}
    if run.candidate_id:
        found = store.list_evaluations(run.candidate_id, limit=1)
        if found:
            metrics = found[0].metrics or {}
            view |= {
                "decision": found[0].decision,
                "rule": found[0].rule,
                "gate_reason": metrics.get("reason"),
                "next_step": metrics.get("next_step"),
            }
        view["promoted"] = any(
            p.action == "promote" and p.candidate_id == run.candidate_id
            for p in store.list_promotions(limit=20)
        )
    return view


def outcome_line(outcome: dict[str, Any]) -> str:
    """One line for a log: "candidate X promoted", "candidate X not promoted (rule): why. Next:
    ...", or why the run was skipped or failed."""
    candidate = outcome.get("candidate_id")
    if outcome["status"] == "skipped":
        return f"skipped: {outcome.get('reason')}"
    if outcome["status"] == "failed":
        return f"failed: {outcome.get('error')}"
    if not candidate:
        return str(outcome["status"])
    if outcome.get("promoted"):
        return f"candidate {candidate} promoted: it serves now (`whetstone report {candidate}`)"
    if outcome.get("decision") is None:
        return f"candidate {candidate} trained, not evaluated (`whetstone eval {candidate}`)"
    line = f"candidate {candidate} not promoted ({outcome['rule']})"
    if outcome.get("gate_reason"):
        line += f": {outcome['gate_reason']}"
    if outcome.get("next_step"):
        line += f". Next: {outcome['next_step']}"
    return line


def promotion_view(p: Promotion) -> dict[str, Any]:
    """One row of the promotion audit log."""
    return {
        "action": p.action,
        "candidate_id": p.candidate_id,
        "previous_id": p.previous_id,
        "forced": p.forced,
        "reason": p.reason,
        "created_at": p.created_at.isoformat(),
    }


def conversation_summary(c: Conversation) -> dict[str, Any]:
    """A conversation without its messages (message_count only where the query loaded it)."""
    return {
        "id": c.id,
        "title": c.title,
        "system_prompt": c.system_prompt,
        "reasoning_effort": c.reasoning_effort,
        "created_at": c.created_at.isoformat(),
        "updated_at": c.updated_at.isoformat(),
        "message_count": getattr(c, "message_count", None),
    }


def search_hit_view(hit: SearchHit) -> dict[str, Any]:
    """A conversation found by a search: its summary, the snippet of what matched, and where
    in the snippet the matched words are ([start, end) character offsets)."""
    return conversation_summary(hit.conversation) | {
        "snippet": hit.snippet,
        "highlights": [list(span) for span in hit.highlights],
    }


def message_view(m: Message) -> dict[str, Any]:
    """A stored message with its current feedback, if any."""
    fb = getattr(m, "current_feedback", None)
    return {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "reasoning": m.reasoning,
        "reply_to_id": m.reply_to_id,
        "adapter_id": m.adapter_id,
        "finish_reason": m.finish_reason,
        "completion_tokens": m.completion_tokens,
        "latency_ms": m.latency_ms,
        "created_at": m.created_at.isoformat(),
        "feedback": None
        if fb is None
        else {"rating": fb.rating, "correction": fb.correction, "comment": fb.comment},
    }


def feedback_view(fb: Feedback) -> dict[str, Any]:
    """One feedback row, as POST /v1/feedback answers it."""
    return {
        "id": fb.id,
        "message_id": fb.message_id,
        "rating": fb.rating,
        "correction": fb.correction,
        "comment": fb.comment,
        "created_at": fb.created_at.isoformat(),
    }


def note_view(note: Note, learned: AbstractSet[str] = frozenset()) -> dict[str, Any]:
    """A note of the memory, as GET /v1/memory lists it. `learned`: the ids of the notes the
    serving adapter answers right without them (Store.learned_notes), listed as "learned"."""
    status = "learned" if note.status == "active" and note.id in learned else note.status
    return {
        "id": note.id,
        "question": note.question,
        "text": note.text,
        "source_message_id": note.source_message_id,
        "adapter_id": note.adapter_id,
        "status": status,
        "created_at": note.created_at.isoformat(),
        "updated_at": note.updated_at.isoformat(),
    }
