"""Checks on what a caller hands the store, before any session opens: one of a set of
choices, text UTF-8 can store, a non-negative number, a timezone-aware time, a JSON object,
only known field names. Each raises InvalidInput naming the field and what it got, so an API
client sees its own mistake (a 422) instead of a database error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from data.errors import InvalidInput
from data.models import FINISH_REASONS, REASONING_EFFORTS

# What add_message takes besides role and content, and what complete_message may still set
# (a reply link, the creation time and the finish reason are fixed when the message is added).
MESSAGE_FIELDS = frozenset(
    {
        "reasoning",
        "reply_to_id",
        "adapter_id",
        "base_model",
        "generation",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "latency_ms",
        "ttft_ms",
        "finish_reason",
        "created_at",
        "completed_at",
        "tool_calls",
        "tool_call_id",
    }
)
COMPLETE_FIELDS = MESSAGE_FIELDS - {"reply_to_id", "finish_reason", "created_at"}


def check_choice(name: str, value: Any, choices: Iterable[str], *, nullable: bool = True) -> None:
    """`value` is one of `choices` (or None, when nullable)."""
    if value is None and nullable:
        return
    choices = tuple(choices)
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_text(name: str, value: Any, *, nullable: bool = True) -> None:
    """`value` is a string UTF-8 can store (or None, when nullable)."""
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


def check_number(name: str, value: Any, *, integer: bool) -> None:
    """`value` is None or a non-negative number (an int, when `integer`)."""
    if value is None:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    # bool is an int subclass; True tokens is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "integer" if integer else "number"
        raise InvalidInput(f"{name} must be a non-negative {kind} or null; got {value!r}")


def check_time(name: str, value: Any) -> None:
    """`value` is None or a timezone-aware datetime (the store keeps UTC)."""
    if value is None:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime; got {value!r}")


def check_json_object(name: str, value: Any, *, nullable: bool = True) -> None:
    """`value` is a mapping (stored as a JSON object), or None when nullable."""
    if value is None and nullable:
        return
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{name} must be a JSON object (dict); got {type(value).__name__}")


def check_known_fields(fields: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    """Every key of `fields` is one of `allowed` (the settable columns of a `what`)."""
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown {what} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def check_message_fields(fields: Mapping[str, Any]) -> None:
    """The optional fields of a message (MESSAGE_FIELDS) each hold what its column takes."""
    for name in ("reasoning", "adapter_id", "base_model"):
        check_text(name, fields.get(name))
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        check_number(name, fields.get(name), integer=True)
    for name in ("latency_ms", "ttft_ms"):
        check_number(name, fields.get(name), integer=False)
    for name in ("created_at", "completed_at"):
        check_time(name, fields.get(name))
    check_choice("finish_reason", fields.get("finish_reason"), FINISH_REASONS)
    check_text("tool_call_id", fields.get("tool_call_id"))
    calls = fields.get("tool_calls")
    if calls is not None and (
        not isinstance(calls, list)
        or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
    ):
        raise InvalidInput("tool_calls must be a list of {id, type, function: {name, arguments}}")
    generation = fields.get("generation")
    check_json_object("generation", generation)
    if generation is not None:
        effort = generation.get("reasoning_effort")
        check_choice("generation.reasoning_effort", effort, REASONING_EFFORTS)
