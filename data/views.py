"""Store rows as JSON-ready dicts: the one shape of each that `whetstone status --json` and
the API worker's bodies show. Timestamps are ISO 8601 strings (datetime.isoformat)."""

from __future__ import annotations

from typing import Any

from data.models import Conversation, Feedback, Message, Promotion, TrainingRun


def run_view(run: TrainingRun) -> dict[str, Any]:
    """A training run: what it is, how it ended, how far it got."""
    return {
        k: getattr(run, k)
        for k in ("id", "status", "profile", "trigger", "reason", "error", "candidate_id")
    } | {"created_at": run.created_at.isoformat(), "progress": run.progress}


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
