"""Training rows built from the store's feedback, in TRL's conversational formats.

feedback_items() reads every assistant answer with current feedback (forgotten conversations
hold no messages, so they contribute nothing). The trainer splits its holdout off the items
by message id, then builds rows from the rest:

    SFT  {"messages": context + [assistant target]}
    DPO  {"prompt": context, "chosen": [assistant], "rejected": [assistant]}
    KTO  {"prompt": context, "completion": [assistant], "label": bool}
    tool {"messages": context + [assistant target], "tools": [function schemas]}

Answers in conversations that used tools (calls, results, or tools offered) go only to the
tool rows, TRL's tool-calling format (assistant `tool_calls`, role `tool` turns, a `tools`
column): `whetstone export` writes them; the trainer does not train on them yet, because
the chat templates render tools differently (harmony natively, others through whetstone's
fallback) and the training path renders none of them.

The ``*_with_ids`` variants pair each row with the message ids it came from, so rows built
from holdout items can be recognised and kept out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import select

from common.fs import atomic_writer
from data.models import Conversation, Feedback, Message
from data.store import Store

log = logging.getLogger(__name__)

# Answers that did not finish: usable only through a correction, never as a completion.
INCOMPLETE = ("cut_off", "error")

Row = dict[str, Any]
RowWithIds = tuple[Row, tuple[str, ...]]


@dataclass(frozen=True)
class FeedbackItem:
    """One assistant answer with its current (merged) feedback and the context it answered.

    context: the conversation's system prompt if any, then the earlier turns (for each
    earlier user turn only its latest answer; regenerated alternatives are not context),
    then the user message answered, always last.
    """

    message_id: str
    conversation_id: str
    prompt_message_id: str  # the user message answered; shared by regenerated answers
    feedback_id: str
    context: list[dict[str, Any]]
    answer: str
    rating: int | None
    correction: str | None
    finish_reason: str | None
    adapter_id: str | None  # which adapter produced the answer; None = the base model
    created_at: datetime  # of the current feedback
    placement: float  # which split it belongs to (data/splits.py)
    judged: bool = False  # a gate judged on it: held out no longer (the rolling holdout)
    tools: list[dict[str, Any]] | None = None  # the functions the request offered
    answer_tool_calls: list[dict[str, Any]] | None = None

    @property
    def complete(self) -> bool:
        """Whether the answer finished, so it may serve as a completion in a row."""
        if self.finish_reason in INCOMPLETE:
            return False
        return bool(self.answer.strip()) or bool(self.answer_tool_calls)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools or self.answer_tool_calls) or any(
            turn["role"] == "tool" or turn.get("tool_calls") for turn in self.context
        )


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _trl_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored OpenAI calls (arguments as JSON text) in TRL's shape (arguments as an object)."""
    out = []
    for call in calls:
        arguments = call["function"]["arguments"]
        with contextlib.suppress(TypeError, ValueError):
            arguments = json.loads(arguments)
        out.append(
            {
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": arguments},
            }
        )
    return out


def _message_turn(message: Message, names: dict[str, str]) -> dict[str, Any]:
    turn: dict[str, Any] = _turn(message.role, message.content)
    if message.tool_calls:
        turn["tool_calls"] = _trl_calls(message.tool_calls)
        names.update({c.get("id", ""): c["function"]["name"] for c in message.tool_calls})
    if message.role == "tool":
        turn["name"] = names.get(message.tool_call_id or "", "")
    return turn


def _context(
    conversation: Conversation, messages: Sequence[Message], prompt: Message
) -> list[dict[str, str]]:
    earlier = [m for m in messages if m.position < prompt.position]
    latest_answer: dict[str, Message] = {}
    for message in earlier:  # position order, so the last one seen is the latest
        answered = message.content.strip() or message.tool_calls
        if message.role == "assistant" and message.reply_to_id and answered:
            latest_answer[message.reply_to_id] = message

    context: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the tool turns
    if conversation.system_prompt:
        context.append(_turn("system", conversation.system_prompt))
    for message in earlier:
        if message.role in ("system", "user", "tool"):
            context.append(_message_turn(message, names))
            if message.id in latest_answer:
                context.append(_message_turn(latest_answer[message.id], names))
        elif message.reply_to_id is None and message.content.strip():
            # An answer to no user turn (e.g. a greeting) is still part of what was said.
            context.append(_turn("assistant", message.content))
    context.append(_message_turn(prompt, names))
    return context


def _prompt_of(
    answer: Message, messages: Sequence[Message], by_id: dict[str, Message]
) -> Message | None:
    if answer.reply_to_id is not None:
        return by_id.get(answer.reply_to_id)
    users = [m for m in messages if m.role in ("user", "tool") and m.position < answer.position]
    return users[-1] if users else None


def feedback_items(store: Store, *, with_tools: bool = False) -> list[FeedbackItem]:
    """Every assistant answer with current feedback, oldest conversation first, then by
    position. Answers cut off or failed (finish_reason cut_off/error) count only when they
    carry a correction. Forgotten conversations contribute nothing. Answers in conversations
    that used tools only `with_tools` (see the module docstring)."""
    with store.read_session() as session:
        rated = session.execute(
            select(Feedback, Message, Conversation)
            .join(Message, Feedback.message_id == Message.id)
            .join(Conversation, Message.conversation_id == Conversation.id)
            .where(
                Feedback.is_current,
                Message.role == "assistant",
                Conversation.forgotten_at.is_(None),
            )
            .order_by(Conversation.created_at, Conversation.id, Message.position)
        ).all()
        with_feedback = (
            select(Message.conversation_id)
            .join(Feedback, Feedback.message_id == Message.id)
            .where(Feedback.is_current)
        )
        by_conversation: dict[str, list[Message]] = {}
        by_id: dict[str, Message] = {}
        for message in session.scalars(
            select(Message)
            .where(Message.conversation_id.in_(with_feedback))
            .order_by(Message.conversation_id, Message.position)
        ):
            by_conversation.setdefault(message.conversation_id, []).append(message)
            by_id[message.id] = message

    items = []
    for feedback, answer, conversation in rated:
        if answer.finish_reason in INCOMPLETE and feedback.correction is None:
            continue
        if not (answer.content.strip() or answer.tool_calls) and feedback.correction is None:
            continue
        messages = by_conversation[conversation.id]
        prompt = _prompt_of(answer, messages, by_id)
        if prompt is None:
            log.debug("skipping %s: it answers no user message", answer.id)
            continue
        items.append(
            FeedbackItem(
                message_id=answer.id,
                conversation_id=conversation.id,
                prompt_message_id=prompt.id,
                feedback_id=feedback.id,
                context=_context(conversation, messages, prompt),
                answer=answer.content,
                rating=feedback.rating,
                correction=feedback.correction,
                finish_reason=answer.finish_reason,
                adapter_id=answer.adapter_id,
                created_at=feedback.created_at,
                # The store places every answer it records feedback for (migration 0003 the
                # older ones); one found unplaced is held out, the side never trained on.
                placement=answer.placement if answer.placement is not None else 0.0,
                judged=answer.judged_at is not None,
                tools=(answer.generation or {}).get("tools"),
                answer_tool_calls=answer.tool_calls,
            )
        )
    return [item for item in items if with_tools or not item.uses_tools]


def _prompt(item: FeedbackItem) -> list[dict[str, Any]]:
    # Fresh dicts per row: rows must not share (and so co-mutate) the item's context.
    return [dict(turn) for turn in item.context]


def _assistant(text: str) -> list[dict[str, str]]:
    return [_turn("assistant", text)]


def sft_rows_with_ids(items: Iterable[FeedbackItem]) -> list[RowWithIds]:
    """SFT rows with their source message ids: the correction if there is one, else the
    answer when rated 4 or 5. Ratings of 3 or less without a correction give no row."""
    rows: list[RowWithIds] = []
    for item in items:
        if item.correction is not None:
            target = item.correction
        elif item.rating is not None and item.rating >= 4 and item.complete:
            target = item.answer
        else:
            continue
        rows.append(({"messages": _prompt(item) + _assistant(target)}, (item.message_id,)))
    return rows


def dpo_rows_with_ids(items: Iterable[FeedbackItem]) -> list[RowWithIds]:
    """DPO rows with their source message ids (chosen first). First every correction vs
    its original answer (where they differ), then every pair of answers to the same user
    message with different ratings, the higher rated chosen."""
    items = list(items)
    rows: list[RowWithIds] = []
    for item in items:
        if (
            item.correction is not None
            and item.complete
            and item.correction.strip() != item.answer.strip()
        ):
            row = {
                "prompt": _prompt(item),
                "chosen": _assistant(item.correction),
                "rejected": _assistant(item.answer),
            }
            rows.append((row, (item.message_id,)))

    by_prompt: dict[str, list[FeedbackItem]] = {}
    for item in items:
        if item.rating is not None and item.complete:
            by_prompt.setdefault(item.prompt_message_id, []).append(item)
    for answers in by_prompt.values():
        for first, second in combinations(answers, 2):
            if first.rating == second.rating or first.answer.strip() == second.answer.strip():
                continue
            chosen, rejected = (first, second) if first.rating > second.rating else (second, first)
            row = {
                "prompt": _prompt(chosen),
                "chosen": _assistant(chosen.answer),
                "rejected": _assistant(rejected.answer),
            }
            rows.append((row, (chosen.message_id, rejected.message_id)))
    return rows


def kto_rows_with_ids(items: Iterable[FeedbackItem]) -> list[RowWithIds]:
    """KTO rows with their source message ids: the answer labelled True for ratings 4-5 and
    False for 1-2 (3 gives no row), and a True row for a correction."""
    rows: list[RowWithIds] = []
    for item in items:
        answer_label = None
        if item.rating is not None and item.complete and item.rating != 3:
            answer_label = item.rating >= 4
            rows.append(
                (
                    {
                        "prompt": _prompt(item),
                        "completion": _assistant(item.answer),
                        "label": answer_label,
                    },
                    (item.message_id,),
                )
            )
        duplicate = answer_label is True and item.correction == item.answer
        if item.correction is not None and not duplicate:
            rows.append(
                (
                    {
                        "prompt": _prompt(item),
                        "completion": _assistant(item.correction),
                        "label": True,
                    },
                    (item.message_id,),
                )
            )
    return rows


def sft_rows(items: Iterable[FeedbackItem]) -> list[Row]:
    """SFT rows ({"messages"}); see sft_rows_with_ids."""
    return [row for row, _ in sft_rows_with_ids(items)]


def dpo_rows(items: Iterable[FeedbackItem]) -> list[Row]:
    """DPO rows ({"prompt", "chosen", "rejected"}); see dpo_rows_with_ids."""
    return [row for row, _ in dpo_rows_with_ids(items)]


def kto_rows(items: Iterable[FeedbackItem]) -> list[Row]:
    """KTO rows ({"prompt", "completion", "label"}); see kto_rows_with_ids."""
    return [row for row, _ in kto_rows_with_ids(items)]


def write_jsonl(rows: Iterable[Row], path: str | os.PathLike[str]) -> int:
    """Write rows as JSON lines, atomically: a reader sees the old file or the whole new
    one, never half of it. Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_writer(path) as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def tool_rows(items: Iterable[FeedbackItem]) -> list[Row]:
    """TRL tool-calling SFT rows from answers in conversations that used tools: the
    correction if there is one, else the answer (its text and calls) when rated 4 or 5."""
    rows: list[Row] = []
    for item in items:
        if not item.uses_tools:
            continue
        if item.correction is not None:
            target: dict[str, Any] = _turn("assistant", item.correction)
        elif item.rating is not None and item.rating >= 4 and item.complete:
            target = _turn("assistant", item.answer)
            if item.answer_tool_calls:
                target["tool_calls"] = _trl_calls(item.answer_tool_calls)
        else:
            continue
        row: Row = {"messages": [*_prompt(item), target]}
        if item.tools:
            row["tools"] = item.tools
        rows.append(row)
    return rows


def export_all(store: Store, out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write sft.jsonl, dpo.jsonl and kto.jsonl from all feedback, and tools.jsonl from the
    answers in conversations that used tools; returns row counts by kind."""
    out = Path(out_dir)
    items = feedback_items(store)
    counts = {
        "sft": write_jsonl(sft_rows(items), out / "sft.jsonl"),
        "dpo": write_jsonl(dpo_rows(items), out / "dpo.jsonl"),
        "kto": write_jsonl(kto_rows(items), out / "kto.jsonl"),
        "tools": write_jsonl(
            tool_rows(feedback_items(store, with_tools=True)), out / "tools.jsonl"
        ),
    }
    log.info("exported %d feedback items to %s: %s", len(items), out, counts)
    return counts
