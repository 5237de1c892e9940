"""Tool calls out of the answer: the call object the API sends (OpenAI's shape) and the two
formats' parsers.

- hermes (plain chat models): Qwen's and NousResearch-Hermes's convention, a call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the answer text;
  `HermesCalls` takes the blocks out of the streamed text.
- harmony (GPT-OSS): a call is a commentary-channel message to ``functions.NAME`` ending in
  ``<|call|>``; the harmony stream decoder finds it by channel and `harmony_call` reads it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from production.chat.partial_text import partial_suffix

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return body if index is None else {"index": index} | body


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolParser(Protocol):
    """Takes the calls out of the answer's streamed text."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """New answer text -> (the text that is content, the calls it completed)."""
        ...

    def flush(self) -> str:
        """The end of the answer: text held back that turned out to be content."""
        ...


class HermesCalls:
    """Splits streamed answer text into content and `<tool_call>` blocks.

    Text that might be the start of `<tool_call>` is held back until it is known; a block's
    JSON becomes a ToolCall when `</tool_call>` closes it. A block that does not parse stays
    in the content (the client sees what the model said)."""

    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.pending += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self.in_call:
                at = self.pending.find(CALL_OPEN)
                if at < 0:
                    keep = partial_suffix(self.pending, CALL_OPEN)
                    content.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                content.append(self.pending[:at])
                self.pending = self.pending[at:]
                self.in_call = True
            end = self.pending.find(CALL_CLOSE)
            if end < 0:
                break
            block = self.pending[len(CALL_OPEN) : end]
            call = _parse_call(block)
            if call is None:
                content.append(self.pending[: end + len(CALL_CLOSE)])
            else:
                calls.append(call)
            self.pending = self.pending[end + len(CALL_CLOSE) :]
            self.in_call = False
        self.calls.extend(calls)
        return "".join(content), calls

    def flush(self) -> str:
        """The end of the answer: an unclosed block or a held-back prefix is content."""
        rest, self.pending, self.in_call = self.pending, "", False
        return rest


def _parse_call(block: str) -> ToolCall | None:
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    else:
        arguments = json.dumps(arguments)
    return ToolCall(new_call_id(), data["name"], arguments)


def harmony_call(recipient: str | None, text: str) -> ToolCall | None:
    """A commentary message to `functions.NAME` as a ToolCall (None: not a function call)."""
    if not recipient or not recipient.startswith("functions."):
        return None
    try:  # compact, as OpenAI sends arguments; text that does not parse is passed on as is
        arguments = json.dumps(json.loads(text))
    except ValueError:
        arguments = text.strip()
    return ToolCall(new_call_id(), recipient.removeprefix("functions."), arguments)
