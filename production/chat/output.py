"""Generated token ids -> what the client sees, for one answer.

The engine samples and hands over ids; the output processor does everything textual: the
chat format's stream decoder (detokenising; harmony's channels and its calls), the tool
parser (hermes calls in the text), OpenAI's stop strings, and the finish reason.

    output = OutputProcessor(fmt, prompt, tools=True, stop=("\\n\\n",), max_tokens=256)
    for token in generated:                 # until output.done
        delta = output.feed(token)          # visible text, reasoning, finished tool calls
    deltas = output.flush()                 # what was held back, at the end
    output.text, output.reasoning, output.tool_calls, output.finish_reason(cancelled)
"""

from __future__ import annotations

from production.chat.decoders import Delta
from production.chat.formats import ChatFormat
from production.chat.stop_strings import StopStrings
from production.chat.tool_calls import ToolCall


class OutputProcessor:
    """One answer's text side (see the module docstring)."""

    def __init__(
        self,
        fmt: ChatFormat,
        prompt: list[int],
        *,
        max_tokens: int,
        raw: bool = False,
        tools: bool = False,
        stop: tuple[str, ...] = (),
    ) -> None:
        self.decoder = fmt.decoder(prompt, raw=raw)
        self.tools = fmt.tool_parser() if tools else None
        self.stops = StopStrings(stop) if stop else None
        self.max_tokens = max_tokens
        self.produced = 0  # ids fed: the answer's completion tokens
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []

    @property
    def done(self) -> bool:
        """The answer is over (the decoder saw its end, or a stop string came): generation
        should stop."""
        return self.decoder.done or self._stopped

    @property
    def _stopped(self) -> bool:
        return self.stops is not None and self.stops.hit

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def feed(self, token: int) -> Delta:
        """One generated id -> what it adds for the client (often nothing yet)."""
        self.produced += 1
        return self._show(self.decoder.feed(token))

    def flush(self) -> list[Delta]:
        """Generation ended: what the decoder, the tool parser and the stop strings held back,
        in that order (the empty ones left out)."""
        deltas = [self._show(self.decoder.flush())]
        # An unclosed call block or a held-back tag prefix is content, cut by the stop strings.
        tail = Delta(self.tools.flush() if self.tools is not None else "")
        if self.stops is not None:
            tail.text = self.stops.feed(tail.text) + self.stops.flush()
        if tail:
            self._text.append(tail.text)
        deltas.append(tail)
        return [delta for delta in deltas if delta]

    def finish_reason(self, cancelled: bool) -> str:
        """OpenAI's finish reason (stop | length | tool_calls), or cancelled."""
        if cancelled:
            return "cancelled"
        if self.tool_calls:
            return "tool_calls"
        if self.decoder.done or self.decoder.stopped_on_eos or self._stopped:
            return "stop"
        return "length" if self.produced >= self.max_tokens else "stop"

    def _show(self, delta: Delta) -> Delta:
        """The decoder's delta -> what the client sees: tool-call blocks out, stop strings
        cut."""
        visible, calls = delta.text, list(delta.tool_calls)
        if self.tools is not None:
            visible, found = self.tools.feed(visible)
            calls += found
        if self.stops is not None:
            visible = self.stops.feed(visible)
        out = Delta(visible, delta.reasoning, tuple(calls))
        if out:
            self._text.append(out.text)
            self._reasoning.append(out.reasoning)
            self.tool_calls.extend(out.tool_calls)
        return out
