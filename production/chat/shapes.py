"""What a grammar-constrained answer wraps around, described per chat format without the
grammar engine: production.decode.answer_grammar builds xgrammar's structural tags from a shape.

A tool call or a JSON answer is JSON inside a frame of the format's own text and control
tokens. Hermes wraps a call's arguments in ``<tool_call>\\n{"name": "NAME", "arguments": `` ...
``}\\n</tool_call>`` and a JSON answer in nothing. Harmony puts a call in a commentary
message to ``functions.NAME`` ended by ``<|call|>``, the answer in the final channel, and lets
the model think on the analysis channel first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Control:
    """A control token, matched as the one token it is: the same text spelled in ordinary
    tokens reads to the parser as content, and a grammar over strings let a small model write
    exactly that."""

    text: str


Piece = str | Control


@dataclass(frozen=True)
class Frame:
    """Pieces around some content: `begin`, the content, then one of `ends`."""

    begin: tuple[Piece, ...]
    ends: tuple[tuple[Piece, ...], ...]


def merged(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """Adjacent text pieces joined into one."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif piece != "":
            out.append(piece)
    return tuple(out)


@dataclass(frozen=True)
class AnswerShape:
    """One chat format's frames for a constrained answer.

    A call to function NAME is `call_open`, NAME, `call_named`, its arguments as JSON, then
    `call_close`."""

    call_open: tuple[Piece, ...]
    call_named: tuple[Piece, ...]
    call_close: tuple[Piece, ...]
    call_separator: str = "\n"  # between calls, where several may come
    one_call: bool = False  # a call ends the turn (harmony's <|call|>): one call at most
    # The message the user sees, around a JSON answer (None: the JSON is the whole answer).
    final: Frame | None = None
    # A message of reasoning the answer may start with, its length bounded by the request.
    thinking: Frame | None = None
    # Never inside thinking: a control token there would end or reshape the message.
    control_tokens: tuple[str, ...] = ()
    # xgrammar's own tag for free text with calls anywhere in it (tool_choice "auto"); None:
    # "auto" is one call or the final message, built from the frames.
    builtin_calls: str | None = None

    def call(self, name: str) -> Frame:
        return Frame(merged((*self.call_open, name, *self.call_named)), (self.call_close,))
