"""The grammar an answer must follow, built from its chat format's shape
(production.chat.shapes): the tools' calls, or a JSON answer. xgrammar structural tags; the
steering compiles them (production.decode.steering.Grammars).

With tools and `tool_choice` other than `none`, a call's arguments always parse and match the
function's schema, and `required` or a named function makes even a 135 M model produce a
valid call.
"""

from __future__ import annotations

from typing import Any

from production.chat.shapes import AnswerShape, Control, Frame, Piece
from production.decode.steering import Grammar, schema_text

Tools = list[dict[str, Any]]

# Whitespace between JSON tokens, at most this many in a row: a model (a small one, or any
# under a grammar that leaves it nothing better) can otherwise emit newlines until max_tokens.
MAX_JSON_WHITESPACE = 4


def tool_calls(
    shape: AnswerShape,
    tools: Tools,
    tool_choice: str | dict[str, Any],
    parallel_tool_calls: bool,
    thinking_tokens: int = 256,
) -> Grammar:
    """The grammar an answer with these tools must follow.

    `auto` where the format has a builtin tag (hermes: xgrammar's Qwen format): text with
    calls anywhere. `required` or a named function start the answer with the call: xgrammar's
    Qwen format allows free text before it, and a small model then talks until max_tokens
    before calling (29 s on SmolLM2 against 2 s). Harmony is built here with control tokens as
    tokens: xgrammar's own harmony tag matches them as strings and, with parallel calls off,
    does not enforce `required`; its `<|call|>` ends the turn, so an answer makes one call."""
    from xgrammar import get_model_structural_tag
    from xgrammar.structural_tag import StructuralTag, TagFormat, TagsWithSeparatorFormat

    if tool_choice == "auto" and shape.builtin_calls is not None:
        tag = get_model_structural_tag(
            shape.builtin_calls,
            tools=tools,
            tool_choice=tool_choice,
            reasoning="disabled",  # the hermes fallback has no thinking block
            parallel_tool_calls=parallel_tool_calls,
        )
        return Grammar("structural_tag", tag.model_dump_json())
    if isinstance(tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    if shape.one_call:
        options: list[Any] = [
            _framed(shape.call(t["function"]["name"]), _json(t["function"].get("parameters")))
            for t in tools
        ]
        if tool_choice == "auto":
            assert shape.final is not None
            options.append(_framed(shape.final, _json(None)))
        return _thinking_first(shape, _one_of(options), thinking_tokens)
    tags = []
    for t in tools:
        frame = shape.call(t["function"]["name"])
        (end,) = frame.ends
        tags.append(
            TagFormat(
                begin=_text(frame.begin),
                content=_json(t["function"].get("parameters")),
                end=_text(end),
            )
        )
    calls = TagsWithSeparatorFormat(
        tags=tags,
        separator=shape.call_separator,
        at_least_one=True,
        stop_after_first=not parallel_tool_calls,
    )
    return Grammar("structural_tag", StructuralTag(format=calls).model_dump_json())


def json_answer(
    shape: AnswerShape, schema: dict[str, Any] | None, strict: bool, thinking_tokens: int
) -> Grammar:
    """An answer that is JSON matching `schema` (None: any object). A format with a final
    message (harmony) puts the JSON there, after thinking of at most `thinking_tokens`."""
    if shape.final is not None:
        return _thinking_first(shape, _framed(shape.final, _json(schema)), thinking_tokens)
    if schema is None:
        return Grammar("json_object")
    return Grammar("json_schema", schema_text(schema), strict)


def _thinking_first(shape: AnswerShape, body: Any, thinking_tokens: int) -> Grammar:
    """`body` after an optional thinking message of at most `thinking_tokens`."""
    from xgrammar.structural_tag import (
        AnyTokensFormat,
        OptionalFormat,
        SequenceFormat,
        StructuralTag,
    )

    if shape.thinking is None:
        answer = body
    else:
        thoughts = AnyTokensFormat(
            exclude_tokens=list(shape.control_tokens), max_tokens=thinking_tokens
        )
        thinking = OptionalFormat(content=_framed(shape.thinking, thoughts))
        answer = SequenceFormat(elements=[thinking, body])
    return Grammar("structural_tag", StructuralTag(format=answer).model_dump_json())


def _framed(frame: Frame, content: Any) -> Any:
    """`content` inside `frame`: its begin, the content, one of its ends."""
    from xgrammar.structural_tag import SequenceFormat

    elements = [_piece(p) for p in frame.begin] + [content]
    if len(frame.ends) == 1:
        elements += [_piece(p) for p in frame.ends[0]]
    else:
        elements.append(_one_of([_pieces(end) for end in frame.ends]))
    return SequenceFormat(elements=elements)


def _pieces(pieces: tuple[Piece, ...]) -> Any:
    from xgrammar.structural_tag import SequenceFormat

    if len(pieces) == 1:
        return _piece(pieces[0])
    return SequenceFormat(elements=[_piece(p) for p in pieces])


def _one_of(options: list[Any]) -> Any:
    from xgrammar.structural_tag import OrFormat

    return OrFormat(elements=options) if len(options) > 1 else options[0]


def _piece(piece: Piece) -> Any:
    from xgrammar.structural_tag import ConstStringFormat, TokenFormat

    if isinstance(piece, Control):
        return TokenFormat(token=piece.text)
    return ConstStringFormat(value=piece)


def _text(pieces: tuple[Piece, ...]) -> str:
    if not all(isinstance(p, str) for p in pieces):
        raise ValueError("a tag between separated calls is text: no control tokens")
    return "".join(str(p) for p in pieces)


def _json(schema: dict[str, Any] | None) -> Any:
    from xgrammar.structural_tag import JSONSchemaFormat

    return JSONSchemaFormat(
        json_schema=schema or {"type": "object"}, max_whitespace_cnt=MAX_JSON_WHITESPACE
    )
