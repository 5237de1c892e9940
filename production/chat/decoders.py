"""Stream decoders: generated token ids into what the user sees, one token at a time.

Plain chat models: incremental detokenisation (multi-byte characters split across tokens come
out whole) that stops at the model's end-of-turn token. Harmony (GPT-OSS): the channel parser
in `production.chat.harmony` splits analysis from the final answer and does not stop at the
first `<|end|>`; a commentary message to a function comes out as a tool call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from production.chat.harmony import ChannelStart, HarmonyStreamParser, Stop, TextDelta
from production.chat.text_stream import TextStream
from production.chat.tool_calls import ToolCall, harmony_call


@dataclass
class Delta:
    """What one generated token added for the user (text, tool calls) and for the record
    (reasoning)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls)


class StreamDecoder(Protocol):
    done: bool  # the decoder saw the end of the answer and generation should stop
    stopped_on_eos: bool  # a stop token ended the answer

    def feed(self, token: int) -> Delta: ...
    def flush(self) -> Delta: ...


class PlainDecoder:
    """Settled text (production.chat.text_stream) until the model's end-of-turn token."""

    def __init__(self, tokenizer: Any, stop_ids: list[int]) -> None:
        self.text = TextStream(tokenizer)
        self.stop_ids = set(stop_ids)
        self.done = False
        self.stopped_on_eos = False

    def feed(self, token: int) -> Delta:
        if self.done:
            return Delta()
        if token in self.stop_ids:
            self.stopped_on_eos = True
            self.done = True
            return self.flush()
        return Delta(text=self.text.push(token))

    def flush(self) -> Delta:
        return Delta(text=self.text.flush())


class HarmonyDecoder:
    """Final channel -> text; analysis (and commentary) -> reasoning, kept for the record;
    a commentary message to ``functions.NAME`` -> a tool call."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        # The prompt says where generation starts: before a header, or inside a prefilled one.
        self.parser = HarmonyStreamParser.from_prompt(tokenizer, prompt)
        self.done = False
        self.stopped_on_eos = False
        self.recipient: str | None = None
        self.call_text: list[str] = []

    def _close_call(self, calls: list[ToolCall]) -> None:
        call = harmony_call(self.recipient, "".join(self.call_text))
        if call is not None:
            calls.append(call)
        self.recipient, self.call_text = None, []

    def _convert(self, events: list[Any]) -> Delta:
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        for event in events:
            if isinstance(event, ChannelStart):
                self._close_call(calls)
                self.recipient = event.recipient
            elif isinstance(event, TextDelta):
                if self.recipient and self.recipient.startswith("functions."):
                    self.call_text.append(event.text)
                else:
                    (text if event.channel == "final" else reasoning).append(event.text)
            elif isinstance(event, Stop):
                self._close_call(calls)
                self.done = True
                self.stopped_on_eos = True
        return Delta(text="".join(text), reasoning="".join(reasoning), tool_calls=tuple(calls))

    def feed(self, token: int) -> Delta:
        return self._convert(self.parser.feed(token))

    def flush(self) -> Delta:
        return self._convert(self.parser.flush())
