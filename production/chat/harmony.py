"""OpenAI's harmony chat format (GPT-OSS): control tokens and a streaming output parser. (The
chat template comes with the model's tokenizer; the tests' is tests/harmony_chat_template.jinja.)

A harmony conversation is a run of messages ``<|start|>{header}<|message|>{content}<|end|>``.
The model answers after the prompt's ``<|start|>assistant`` in several messages on channels::

    <|channel|>analysis<|message|>User asks simple math.<|end|>
    <|start|>assistant<|channel|>final<|message|>2+2 = 4.<|return|>

``analysis`` is the chain of thought, ``commentary`` holds tool calls and preambles, ``final`` is
what the user sees. ``<|end|>`` only closes one message, so generation must not stop on it (it
once did, and the person got the analysis and no answer): it stops on ``<|return|>`` (end of the
final answer) or ``<|call|>`` (a tool call); see :func:`stop_token_ids`. The parser also ends
the answer when a ``final`` message is closed by ``<|end|>``.

    parser = HarmonyStreamParser(tokenizer)     # the prompt ended with <|start|>assistant
    for token_id in generated:
        for event in parser.feed(token_id):
            ...                                 # TextDelta / ChannelStart / Stop
    events = parser.flush()                     # held-back text if no Stop came
    parser.final, parser.analysis, parser.stop_reason
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from production.chat.text_stream import TextStream

START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
RETURN = "<|return|>"
CALL = "<|call|>"
CONSTRAIN = "<|constrain|>"
ENDOFTEXT = "<|endoftext|>"

HARMONY_SPECIAL_TOKENS = [START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN]
"""The harmony control tokens; a harmony tokenizer holds each as one special token."""

StopReason = Literal["return", "call", "final_end", "eos"]


@dataclass(frozen=True)
class TextDelta:
    """New content text of one channel's message (never header text, never special tokens)."""

    channel: str
    text: str


@dataclass(frozen=True)
class ChannelStart:
    """A message header ended at ``<|message|>``: its channel, recipient and content type.

    ``recipient`` is e.g. ``"functions.get_weather"`` for a tool call (``to=...``), else None;
    ``content_type`` is what ``<|constrain|>`` named (e.g. ``"json"``), else None.
    """

    channel: str
    recipient: str | None = None
    content_type: str | None = None
    role: str = "assistant"


@dataclass(frozen=True)
class Stop:
    """Generation is over: ``return`` (final answer done), ``call`` (a tool call), ``final_end``
    (a final message closed by ``<|end|>``) or ``eos`` (end-of-text / the tokenizer's eos)."""

    reason: StopReason


Event = TextDelta | ChannelStart | Stop


@dataclass(frozen=True)
class HarmonyMessage:
    """One parsed message of the completion."""

    channel: str
    text: str
    recipient: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class HarmonyResult:
    """A whole completion, parsed. ``stop_reason`` is None when no stop token came (max tokens):
    then ``final`` may be "" although the model was still thinking."""

    final: str
    analysis: str
    commentary: str
    stop_reason: StopReason | None
    messages: tuple[HarmonyMessage, ...] = ()


class HarmonyTokenError(ValueError):
    """The tokenizer lacks the harmony special tokens."""


@dataclass(frozen=True)
class _Ids:
    start: int
    end: int
    message: int
    channel: int
    return_: int
    call: int
    constrain: int
    eos: frozenset[int]


def _harmony_ids(tokenizer: Any) -> _Ids:
    def lookup(token: str) -> int | None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            return None  # an unknown token maps to unk (or None)
        return int(token_id)

    found = {token: lookup(token) for token in HARMONY_SPECIAL_TOKENS}
    missing = [token for token, token_id in found.items() if token_id is None]
    if missing:
        raise HarmonyTokenError(
            f"the tokenizer has no single token for {', '.join(missing)}: "
            "harmony output needs a GPT-OSS tokenizer"
        )
    ids = {token: int(token_id) for token, token_id in found.items() if token_id is not None}
    harmony = set(ids.values())
    eos = {lookup(ENDOFTEXT), tokenizer.eos_token_id}
    return _Ids(
        start=ids[START],
        end=ids[END],
        message=ids[MESSAGE],
        channel=ids[CHANNEL],
        return_=ids[RETURN],
        call=ids[CALL],
        constrain=ids[CONSTRAIN],
        eos=frozenset(int(i) for i in eos if i is not None and int(i) not in harmony),
    )


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids generate() should stop on: ``<|return|>``, ``<|call|>``, then ``<|endoftext|>``
    and the tokenizer's eos where they differ. Never ``<|end|>``: it only closes a message."""
    ids = _harmony_ids(tokenizer)
    stops = [ids.return_, ids.call]
    stops += sorted(i for i in ids.eos if i not in stops)
    return stops


# A header's role part, when the header did not begin with a generated <|start|>: empty, the
# role, a recipient, or a beginning of them. Anything else is content written without a header.
_ROLE_PART = re.compile(r"(?:assistant)?\s*(?:to=\S*)?")
_ROLE_PART_PREFIXES = ("assistant to=", "to=")
_MAX_ROLE_PART_CHARS = 80
# The longest header a model writes: "assistant to=functions.<64-char name> " + "<|channel|>
# commentary" + "<|constrain|>json". Past this, or at a control character, the "header" is text
# written after a stray control token and is shown as text: held back as a header, a random
# GPT-OSS's answers hid up to 246 of their 256 tokens while the stream ran on.
_MAX_HEADER_CHARS = 160


def _could_be_role_part(text: str) -> bool:
    if "\n" in text or len(text) > _MAX_ROLE_PART_CHARS:
        return False
    stripped = text.strip()
    return bool(
        _ROLE_PART.fullmatch(stripped)
        or any(full.startswith(stripped) for full in _ROLE_PART_PREFIXES)
    )


class _Header:
    """Ids of a message header, split at <|channel|> and <|constrain|>."""

    def __init__(self, *, explicit: bool, role: str | None = None) -> None:
        self.explicit = explicit  # began with a generated <|start|>: its first word is the role
        self.role = role  # known before any id, e.g. the prompt's <|start|>assistant
        self.parts: dict[str, list[int]] = {"role": [], "channel": [], "constrain": []}
        self.section = "role"
        self.saw_marker = False  # a <|channel|> or <|constrain|> came: surely a header

    def add(self, token_id: int) -> None:
        self.parts[self.section].append(token_id)

    def mark(self, section: str) -> None:
        self.section, self.saw_marker = section, True

    def parse(self, decode: Callable[[list[int]], str]) -> ChannelStart:
        role_words = decode(self.parts["role"]).split()
        channel_words = decode(self.parts["channel"]).split()
        constrain = decode(self.parts["constrain"]).strip() or None
        role = self.role
        if self.explicit and role_words and not role_words[0].startswith("to="):
            role = role_words.pop(0)
        recipient = None
        for word in role_words + channel_words:
            if word.startswith("to=") and recipient is None:
                recipient = word[3:] or None
        others = [word for word in channel_words if not word.startswith("to=")]
        role = role or "assistant"
        channel = others[0] if others else ("final" if role == "assistant" else role)
        content_type = constrain or (others[1] if len(others) > 1 else None)
        return ChannelStart(channel, recipient, content_type, role)


class HarmonyStreamParser:
    """Splits generated harmony tokens into channels as they arrive.

    ``channel=None`` (the default) starts where the template's generation prompt leaves off,
    after ``<|start|>assistant``, expecting a header. ``channel="final"`` starts inside that
    channel's content, for a prompt prefilled up to ``<|channel|>final<|message|>``
    (:meth:`from_prompt` works this out from the prompt ids).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        channel: str | None = None,
        recipient: str | None = None,
    ) -> None:
        self._ids = _harmony_ids(tokenizer)
        self._tokenizer = tokenizer
        self._decode = self._make_decode(tokenizer)
        self._messages: list[HarmonyMessage] = []
        self._header: _Header | None = None
        self._content: TextStream | None = None
        self._current: ChannelStart | None = None
        self._current_text: list[str] = []
        # The channel a control token interrupted: where the text goes if what follows the
        # token turns out not to be a header.
        self._interrupted: str | None = None
        self.stop_reason: StopReason | None = None
        self._closed = False
        if channel is None:
            self._header = _Header(explicit=False, role="assistant")
        else:
            self._open_content(ChannelStart(channel, recipient))

    @classmethod
    def from_prompt(cls, tokenizer: Any, prompt_ids: Iterable[int]) -> HarmonyStreamParser:
        """A parser for what follows ``prompt_ids``: in content when the prompt ends inside a
        message (after ``<|message|>``, maybe with prefilled text), else expecting a header."""
        parser = cls(tokenizer)
        ids = [int(i) for i in prompt_ids]
        marks = {parser._ids.start, parser._ids.end, parser._ids.message}
        last = max((n for n, token_id in enumerate(ids) if token_id in marks), default=-1)
        if last < 0 or ids[last] == parser._ids.end:
            return parser  # expecting a header
        begin = last + 1
        if ids[last] == parser._ids.message:
            starts = [n for n, token_id in enumerate(ids[:last]) if token_id == parser._ids.start]
            begin = starts[-1] + 1 if starts else 0
        header = _Header(explicit=True)
        for token_id in ids[begin:last] if ids[last] == parser._ids.message else ids[begin:]:
            if token_id == parser._ids.channel:
                header.mark("channel")
            elif token_id == parser._ids.constrain:
                header.mark("constrain")
            else:
                header.add(token_id)
        if ids[last] == parser._ids.message:
            parser._header = None
            parser._open_content(header.parse(parser._decode))
        elif header.saw_marker:
            parser._header = header  # the prompt ends inside a header, after its channel
        else:  # the prompt ends "<|start|>assistant": the header is still to come
            role = parser._decode(header.parts["role"]).split()
            parser._header = _Header(explicit=False, role=role[0] if role else None)
        return parser

    @staticmethod
    def _make_decode(tokenizer: Any) -> Callable[[list[int]], str]:
        def decode(ids: list[int]) -> str:
            if not ids:
                return ""
            return tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )

        return decode

    # -- state ---------------------------------------------------------------------------

    @property
    def is_done(self) -> bool:
        """A stop token (or a final message's <|end|>) came; further feeds are ignored."""
        return self.stop_reason is not None

    @property
    def messages(self) -> list[HarmonyMessage]:
        """The messages so far, the open one included."""
        done = list(self._messages)
        if self._current is not None:
            done.append(self._message(self._current, "".join(self._current_text)))
        return done

    def text(self, channel: str) -> str:
        """All content of one channel so far; its messages joined by a blank line."""
        return "\n\n".join(m.text for m in self.messages if m.channel == channel and m.text)

    @property
    def final(self) -> str:
        return self.text("final")

    @property
    def analysis(self) -> str:
        return self.text("analysis")

    @property
    def commentary(self) -> str:
        return self.text("commentary")

    def result(self) -> HarmonyResult:
        return HarmonyResult(
            self.final, self.analysis, self.commentary, self.stop_reason, tuple(self.messages)
        )

    # -- feeding -------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        """Consume one generated token; return what it completed."""
        if self.is_done or self._closed:
            return []
        token_id = int(token_id)
        events: list[Event] = []
        if self._content is not None:
            self._feed_content(token_id, events)
        else:
            self._feed_header(token_id, events)
        return events

    def flush(self) -> list[Event]:
        """Generation ended without a Stop (e.g. max tokens): hand out held-back text."""
        if self.is_done or self._closed:
            return []
        events: list[Event] = []
        header = self._header
        if header is not None and self._headerless(header, final=True):
            self._header_to_content(header, events)
        self._close_content(events)
        self._closed = True
        return events

    def _feed_content(self, token_id: int, events: list[Event]) -> None:
        ids = self._ids
        if token_id == ids.end:
            channel = self._close_content(events)
            if channel == "final":
                self._stop("final_end", events)
            else:
                self._header = _Header(explicit=False)  # expect <|start|> next
        elif token_id in (ids.return_, ids.call) or token_id in ids.eos:
            self._close_content(events)
            self._stop_for(token_id, events)
        elif token_id == ids.start:  # the message ended without <|end|>
            self._interrupted = self._close_content(events)
            self._header = _Header(explicit=True)
        elif token_id == ids.channel:
            self._interrupted = self._close_content(events)
            self._header = _Header(explicit=False)
            self._header.mark("channel")
        elif token_id in (ids.message, ids.constrain):
            pass  # out of place in content; dropped
        else:
            self._push(token_id, events)

    def _feed_header(self, token_id: int, events: list[Event]) -> None:
        ids = self._ids
        header = self._header
        assert header is not None
        if token_id == ids.message:
            self._header = self._interrupted = None
            start = header.parse(self._decode)
            events.append(start)
            self._open_content(start)
        elif token_id == ids.channel:
            header.mark("channel")
        elif token_id == ids.constrain:
            header.mark("constrain")
        elif token_id == ids.start:
            self._header = _Header(explicit=True)
        elif token_id == ids.end or token_id in (ids.return_, ids.call) or token_id in ids.eos:
            if self._headerless(header, final=True):
                self._header_to_content(header, events)
                self._feed_content(token_id, events)
            elif token_id == ids.end:
                self._header = _Header(explicit=False)  # a stray <|end|>
            else:
                self._stop_for(token_id, events)
        else:
            header.add(token_id)
            if self._headerless(header, final=False) or self._runs_on(header):
                self._header_to_content(header, events)

    def _headerless(self, header: _Header, *, final: bool) -> bool:
        """Whether an implicit header's ids are really content written with no header."""
        if header.explicit or header.saw_marker or not header.parts["role"]:
            return False
        text = self._decode(header.parts["role"])
        if final:  # nothing more will come: only a whole role part is a header
            return not _ROLE_PART.fullmatch(text.strip())
        return not _could_be_role_part(text)

    def _runs_on(self, header: _Header) -> bool:
        """Whether the header has run past any real one (see _MAX_HEADER_CHARS)."""
        text = self._decode([t for part in header.parts.values() for t in part])
        return len(text) > _MAX_HEADER_CHARS or any(c < " " for c in text)

    def _header_to_content(self, header: _Header, events: list[Event]) -> None:
        """The header's ids were text: content of the channel they interrupted (or final)."""
        self._header = None
        start = ChannelStart(self._interrupted or "final")
        self._interrupted = None
        events.append(start)
        self._open_content(start)
        for part in header.parts.values():
            for token_id in part:
                self._push(token_id, events)

    def _open_content(self, start: ChannelStart) -> None:
        self._current = start
        self._current_text = []
        self._content = TextStream(self._tokenizer)

    def _push(self, token_id: int, events: list[Event]) -> None:
        assert self._content is not None and self._current is not None
        self._emit(self._content.push(token_id), events)

    def _emit(self, text: str, events: list[Event]) -> None:
        if text and self._current is not None:
            self._current_text.append(text)
            events.append(TextDelta(self._current.channel, text))

    def _close_content(self, events: list[Event]) -> str | None:
        """End the open message, if any; return its channel."""
        if self._content is None or self._current is None:
            return None
        self._emit(self._content.flush(), events)
        current = self._current
        self._messages.append(self._message(current, "".join(self._current_text)))
        self._content = self._current = None
        self._current_text = []
        return current.channel

    @staticmethod
    def _message(start: ChannelStart, text: str) -> HarmonyMessage:
        return HarmonyMessage(start.channel, text, start.recipient, start.content_type)

    def _stop_for(self, token_id: int, events: list[Event]) -> None:
        if token_id == self._ids.return_:
            self._stop("return", events)
        elif token_id == self._ids.call:
            self._stop("call", events)
        else:
            self._stop("eos", events)

    def _stop(self, reason: StopReason, events: list[Event]) -> None:
        self._header = None
        self.stop_reason = reason
        events.append(Stop(reason))


def parse_completion(
    tokenizer: Any,
    token_ids: Iterable[int],
    *,
    channel: str | None = None,
) -> HarmonyResult:
    """Parse a whole generated sequence (the ids after the prompt's ``<|start|>assistant``,
    or after ``<|message|>`` of a prefilled ``channel``)."""
    parser = HarmonyStreamParser(tokenizer, channel=channel)
    for token_id in token_ids:
        if parser.feed(token_id) and parser.is_done:
            break
    parser.flush()
    return parser.result()
