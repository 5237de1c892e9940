"""Function calling: tools into the prompt, tool calls out of the answer, in the model's format.

Two formats:

- ``harmony`` (GPT-OSS): functions are declared in the developer message (the chat template's
  ``tools``), a call is a commentary-channel message to ``functions.NAME`` ending in
  ``<|call|>``; results come back as ``<|start|>functions.NAME to=assistant`` messages.
- ``hermes`` (every other chat model): Qwen's and NousResearch-Hermes's convention, a call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the answer text. A chat
  template that renders ``tools`` itself and knows ``<tool_call>`` (Qwen 2.5/3, Hermes) renders
  the prompt; any other template (SmolLM2's has no tool support) gets whetstone's fallback:
  the tool list in the system message in the same words Qwen's template uses, earlier calls as
  ``<tool_call>`` text and results as user turns in ``<tool_response>`` tags.

With tools and ``tool_choice`` other than ``none``, the answer is constrained by the format's
xgrammar structural tag (``xgrammar.get_model_structural_tag``): a call's arguments always
parse and match the function's schema, and ``required`` or a named function makes even a
135 M model produce a valid call.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from production.partial_text import partial_suffix
from production.steering import Grammar

ToolFormat = Literal["harmony", "hermes"]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

# Qwen 2.5's template words, so a model tuned on that convention recognises the prompt.
_HERMES_SYSTEM = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


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


def tool_format(chat_format: str) -> ToolFormat:
    return "harmony" if chat_format == "harmony" else "hermes"


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's own chat template declares tools in the hermes convention."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return "tools" in template and CALL_OPEN in template


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    fmt: ToolFormat,
    tokenizer: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The request's messages (OpenAI shape, tool turns included) as the chat template takes
    them, and the `tools` argument for it (None: the template is not given tools)."""
    native = fmt == "harmony" or template_renders_tools(tokenizer)
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments_object(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
            out.append(m)
        return out, tools or None
    # The fallback: plain roles only, so any template renders it.
    out = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                f"{CALL_OPEN}\n"
                + json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": _arguments_object(c["function"]["arguments"]),
                    }
                )
                + f"\n{CALL_CLOSE}"
                for c in m["tool_calls"]
            ]
            content = ((m.get("content") or "") + "\n" + "\n".join(calls)).strip()
            out.append({"role": "assistant", "content": content})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "".join("\n" + json.dumps(t) for t in tools)
        block = _HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = out[0] | {"content": out[0]["content"] + block}
        else:
            out.insert(0, {"role": "system", "content": block.lstrip()})
    return out, None


def structural_tag(
    fmt: ToolFormat,
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    parallel_tool_calls: bool,
    thinking_tokens: int = 256,
) -> Grammar:
    """The grammar an answer with these tools must follow.

    Harmony: built here with control tokens as tokens (see `_harmony`); xgrammar's own
    harmony tag matches them as strings and, with parallel calls off, does not enforce
    `required`. Hermes `auto`: xgrammar's Qwen format. For hermes, `required` and a named
    function start the answer with the call: xgrammar's
    Qwen format allows free text before it, and a small model then talks until max_tokens
    before calling (29 s on SmolLM2 against 2 s)."""
    from xgrammar import get_model_structural_tag

    if fmt == "harmony":
        # `<|call|>` ends the turn: a harmony answer makes one call.
        return _harmony_tools(tools, tool_choice, thinking_tokens)
    if tool_choice != "auto":
        return _hermes_calls_only(tools, tool_choice, parallel_tool_calls)
    tag = get_model_structural_tag(
        "qwen_3",
        tools=tools,
        tool_choice=tool_choice,
        reasoning="disabled",  # the hermes fallback has no thinking block
        parallel_tool_calls=parallel_tool_calls,
    )
    return Grammar("structural_tag", tag.model_dump_json())


def _hermes_calls_only(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool
) -> Grammar:
    from xgrammar.structural_tag import (
        StructuralTag,
        TagFormat,
        TagsWithSeparatorFormat,
    )

    if isinstance(tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    tags = [
        TagFormat(
            begin=f'{CALL_OPEN}\n{{"name": "{t["function"]["name"]}", "arguments": ',
            content=_json_format(t["function"].get("parameters")),
            end=f"}}\n{CALL_CLOSE}",
        )
        for t in tools
    ]
    calls = TagsWithSeparatorFormat(
        tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel
    )
    return Grammar("structural_tag", StructuralTag(format=calls).model_dump_json())


def _harmony(body: Any, thinking_tokens: int) -> Grammar:
    """A harmony answer: an optional analysis message of at most `thinking_tokens`, then
    `body` (the call or the final message): the bound leaves the answer room before
    max_tokens (a model that thinks on would never get to the call).

    Control tokens are matched as tokens (xgrammar's TokenFormat): the same text
    spelled in ordinary tokens would read to the parser as content, and a grammar over
    strings let a small model do exactly that."""
    from xgrammar.structural_tag import (
        AnyTokensFormat,
        ConstStringFormat,
        OptionalFormat,
        SequenceFormat,
        StructuralTag,
        TokenFormat,
    )

    from production.harmony import CHANNEL, END, HARMONY_SPECIAL_TOKENS, MESSAGE, START

    analysis = SequenceFormat(
        elements=[
            TokenFormat(token=CHANNEL),
            ConstStringFormat(value="analysis"),
            TokenFormat(token=MESSAGE),
            AnyTokensFormat(
                exclude_tokens=list(HARMONY_SPECIAL_TOKENS), max_tokens=thinking_tokens
            ),
            TokenFormat(token=END),
            TokenFormat(token=START),
            ConstStringFormat(value="assistant"),
        ]
    )
    thinking = OptionalFormat(content=analysis)
    return Grammar(
        "structural_tag",
        StructuralTag(format=SequenceFormat(elements=[thinking, body])).model_dump_json(),
    )


def _harmony_tools(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], thinking_tokens: int
) -> Grammar:
    """One call (`<|call|>` ends the turn) to one of `tools`, or (auto) a final answer."""
    from xgrammar.structural_tag import (
        ConstStringFormat,
        OrFormat,
        SequenceFormat,
        TokenFormat,
    )

    from production.harmony import CALL, CHANNEL, CONSTRAIN, MESSAGE

    if isinstance(tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    options: list[Any] = [
        SequenceFormat(
            elements=[
                TokenFormat(token=CHANNEL),
                ConstStringFormat(value=f"commentary to=functions.{t['function']['name']} "),
                TokenFormat(token=CONSTRAIN),
                ConstStringFormat(value="json"),
                TokenFormat(token=MESSAGE),
                _json_format(t["function"].get("parameters")),
                TokenFormat(token=CALL),
            ]
        )
        for t in tools
    ]
    if tool_choice == "auto":
        options.append(_harmony_final(None))
    body = OrFormat(elements=options) if len(options) > 1 else options[0]
    return _harmony(body, thinking_tokens)


def _harmony_final(schema: dict[str, Any] | bool | None) -> Any:
    """The final message: JSON matching `schema` (None: any object), or (False) any text."""
    from xgrammar.structural_tag import (
        AnyTokensFormat,
        ConstStringFormat,
        OrFormat,
        SequenceFormat,
        TokenFormat,
    )

    from production.harmony import CHANNEL, END, HARMONY_SPECIAL_TOKENS, MESSAGE, RETURN

    if schema is False:
        content: Any = AnyTokensFormat(exclude_tokens=list(HARMONY_SPECIAL_TOKENS))
    else:
        content = _json_format(schema)
    return SequenceFormat(
        elements=[
            TokenFormat(token=CHANNEL),
            ConstStringFormat(value="final"),
            TokenFormat(token=MESSAGE),
            content,
            OrFormat(elements=[TokenFormat(token=RETURN), TokenFormat(token=END)]),
        ]
    )


def harmony_json(schema: dict[str, Any] | None, thinking_tokens: int) -> Grammar:
    """A harmony answer whose final message is JSON (matching `schema`, or any object); the
    analysis channel may come first, as the model thinks before it answers."""
    return _harmony(_harmony_final(schema), thinking_tokens)


# Whitespace between JSON tokens, at most this many in a row: a model (a small one, or any
# under a grammar that leaves it nothing better) can otherwise emit newlines until max_tokens.
MAX_JSON_WHITESPACE = 4


def _json_format(schema: dict[str, Any] | None) -> Any:
    from xgrammar.structural_tag import JSONSchemaFormat

    return JSONSchemaFormat(
        json_schema=schema or {"type": "object"}, max_whitespace_cnt=MAX_JSON_WHITESPACE
    )


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
