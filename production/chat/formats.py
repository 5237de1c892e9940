"""The chat format a model speaks, as one object: `chat_format(name, tokenizer)`, chosen by
`settings.model.chat_format`.

    fmt = chat_format("harmony", tokenizer)
    messages, tools = fmt.template_messages(messages, tools)
    ids = tokenizer.apply_chat_template(messages, ..., **fmt.template_arguments(effort, tools))
    decoder = fmt.decoder(prompt)          # token ids -> text, reasoning, tool calls
    fmt.stop_ids, fmt.tool_parser(), fmt.answer_shape, fmt.completion_text(ids)
"""

from __future__ import annotations

from typing import Any, Protocol

from production.chat import harmony
from production.chat.decoders import HarmonyDecoder, PlainDecoder, StreamDecoder
from production.chat.shapes import AnswerShape, Control, Frame
from production.chat.tool_calls import CALL_CLOSE, CALL_OPEN, HermesCalls, ToolParser
from production.chat.tool_prompt import (
    Messages,
    Tools,
    hermes_messages,
    native_messages,
    template_renders_tools,
)


class ChatFormat(Protocol):
    """What the worker asks of the chat format its model speaks."""

    name: str  # as settings.model.chat_format names it
    stop_ids: list[int]  # generation stops at any of these
    answer_shape: AnswerShape  # what a grammar-constrained answer wraps around

    def decoder(self, prompt: list[int], *, raw: bool = False) -> StreamDecoder:
        """A stream decoder for what the model generates after `prompt` (raw: a completion
        of raw text, detokenised with no chat-format parsing)."""
        ...

    def tool_parser(self) -> ToolParser | None:
        """What takes tool calls out of the answer's text (None: the decoder finds them)."""
        ...

    def template_messages(
        self, messages: Messages, tools: Tools | None
    ) -> tuple[Messages, Tools | None]:
        """The request's messages as the chat template takes them, and its `tools`."""
        ...

    def template_arguments(
        self, reasoning_effort: str | None, tools: Tools | None
    ) -> dict[str, Any]:
        """apply_chat_template's keyword arguments beyond the messages."""
        ...

    def completion_text(self, ids: list[int]) -> str:
        """The answer in a whole generated sequence (the ids after the prompt)."""
        ...


def plain_stop_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos, and ChatML's end of turn where the vocabulary has it."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return [i for i in ids if i is not None]


class PlainFormat:
    """The tokenizer's own chat template; tool calls in the hermes convention."""

    name = "plain"
    answer_shape = AnswerShape(
        call_open=(f'{CALL_OPEN}\n{{"name": "',),
        call_named=('", "arguments": ',),
        call_close=(f"}}\n{CALL_CLOSE}",),
        builtin_calls="qwen_3",
    )

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = plain_stop_ids(tokenizer)

    def decoder(self, prompt: list[int], *, raw: bool = False) -> StreamDecoder:
        return PlainDecoder(self.tokenizer, self.stop_ids)

    def tool_parser(self) -> ToolParser | None:
        return HermesCalls()

    def template_messages(
        self, messages: Messages, tools: Tools | None
    ) -> tuple[Messages, Tools | None]:
        if template_renders_tools(self.tokenizer):
            return native_messages(messages, tools)
        return hermes_messages(messages, tools)

    def template_arguments(
        self, reasoning_effort: str | None, tools: Tools | None
    ) -> dict[str, Any]:
        return {"tools": tools} if tools else {}

    def completion_text(self, ids: list[int]) -> str:
        ended = next((n for n, token in enumerate(ids) if token in self.stop_ids), None)
        kept = ids if ended is None else ids[:ended]
        return self.tokenizer.decode(kept, skip_special_tokens=False)


class HarmonyFormat:
    """OpenAI's harmony (GPT-OSS): channels, functions declared by the template, a call as a
    commentary message to `functions.NAME`."""

    name = "harmony"
    answer_shape = AnswerShape(
        call_open=(Control(harmony.CHANNEL), "commentary to=functions."),
        call_named=(" ", Control(harmony.CONSTRAIN), "json", Control(harmony.MESSAGE)),
        call_close=(Control(harmony.CALL),),
        one_call=True,
        final=Frame(
            (Control(harmony.CHANNEL), "final", Control(harmony.MESSAGE)),
            ((Control(harmony.RETURN),), (Control(harmony.END),)),
        ),
        # The bound leaves the answer room before max_tokens: a model that thinks on would
        # never get to the call.
        thinking=Frame(
            (Control(harmony.CHANNEL), "analysis", Control(harmony.MESSAGE)),
            ((Control(harmony.END), Control(harmony.START), "assistant"),),
        ),
        control_tokens=tuple(harmony.HARMONY_SPECIAL_TOKENS),
    )

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = harmony.stop_token_ids(tokenizer)

    def decoder(self, prompt: list[int], *, raw: bool = False) -> StreamDecoder:
        if raw:
            return PlainDecoder(self.tokenizer, self.stop_ids)
        return HarmonyDecoder(self.tokenizer, prompt)

    def tool_parser(self) -> ToolParser | None:
        return None

    def template_messages(
        self, messages: Messages, tools: Tools | None
    ) -> tuple[Messages, Tools | None]:
        return native_messages(messages, tools)

    def template_arguments(
        self, reasoning_effort: str | None, tools: Tools | None
    ) -> dict[str, Any]:
        arguments: dict[str, Any] = {"reasoning_effort": reasoning_effort or "medium"}
        return arguments | ({"tools": tools} if tools else {})

    def completion_text(self, ids: list[int]) -> str:
        return harmony.parse_completion(self.tokenizer, ids).final


def chat_format(name: str, tokenizer: Any) -> ChatFormat:
    """The format `name` (settings.model.chat_format) over `tokenizer`; a harmony tokenizer
    must have the harmony control tokens (HarmonyTokenError)."""
    if name == "harmony":
        return HarmonyFormat(tokenizer)
    if name == "plain":
        return PlainFormat(tokenizer)
    raise ValueError(f"unknown chat format {name!r}: 'plain' or 'harmony'")
