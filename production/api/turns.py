"""A client's messages as stored turns, and how a client's history is matched to a stored
conversation (clients resend the whole conversation with every request)."""

from __future__ import annotations

import json
from typing import Any

from data.models import Conversation
from production.api.openai_schema import ChatMessage


def system_and_body(messages: list[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    """The system prompt (a leading system or developer message), and the messages after it."""
    if messages[0].role in ("system", "developer"):
        return messages[0].text(), messages[1:]
    return None, messages


def turns_of(messages: list[ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """The system prompt, and the other messages as the store and the chat template take
    them (tool calls and tool results included; a tool turn carries its function's name)."""
    system, body = system_and_body(messages)
    names: dict[str, str] = {}
    turns: list[dict[str, Any]] = []
    for m in body:
        turn: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            names |= {c.id: c.function.name for c in m.tool_calls}
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
            turn["name"] = m.name or names.get(m.tool_call_id or "", "")
        turns.append(turn)
    return system, turns


def _turn_key(role: str, content: str, tool_calls: Any, tool_call_id: str | None) -> tuple:
    """What makes a client's turn the same as a stored one (arguments compared as JSON, not
    text: clients re-serialise them)."""
    calls = []
    for call in tool_calls or []:
        try:
            arguments = json.dumps(json.loads(call["function"]["arguments"]), sort_keys=True)
        except (ValueError, TypeError):
            arguments = call["function"]["arguments"]
        calls.append((call["function"]["name"], arguments))
    return (role, content, tuple(calls), tool_call_id)


def key_of(turn: dict[str, Any]) -> tuple:
    return _turn_key(
        turn["role"], turn["content"], turn.get("tool_calls"), turn.get("tool_call_id")
    )


def active_path(conversation: Conversation) -> list[tuple]:
    """The conversation as a client sees it: each user or tool turn and its latest answer."""
    latest_answer: dict[str, Any] = {}
    for m in conversation.messages:
        if m.role == "assistant" and m.finish_reason is not None:
            latest_answer[m.reply_to_id] = m
    path = []
    for m in conversation.messages:
        if m.role in ("user", "tool"):
            path.append(_turn_key(m.role, m.content, None, m.tool_call_id))
            if m.id in latest_answer:
                answer = latest_answer[m.id]
                path.append(_turn_key("assistant", answer.content, answer.tool_calls, None))
    return path
