"""OpenAI's `stop` parameter: the answer ends before the first stop string, and a client
never sees a stop string or a piece of one."""

from __future__ import annotations

from production.chat.partial_text import partial_suffix


class StopStrings:
    """The answer ends before the first occurrence of any stop string.

    Text that could be the start of a stop string is held back until the next text decides,
    so a client never sees a stop string or a piece of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit or not text:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[: min(found)], "", True
            return out
        keep = max(partial_suffix(self.pending, s) for s in self.stops)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.hit else out
