"""Tools into the prompt: the request's messages (OpenAI shape, tool turns included) as the
chat template takes them.

A template that renders ``tools`` itself (harmony's: functions in the developer message; Qwen
2.5/3's and Hermes's, which know ``<tool_call>``) gets the messages with each call's
arguments as an object, and the tools. Any other template (SmolLM2's has no tool support)
gets whetstone's hermes fallback: the tool list in the system message in the same words
Qwen's template uses, earlier calls as ``<tool_call>`` text and results as user turns in
``<tool_response>`` tags.
"""

from __future__ import annotations

import json
from typing import Any

from production.chat.tool_calls import CALL_CLOSE, CALL_OPEN

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]]

# Qwen 2.5's template words, so a model tuned on that convention recognises the prompt.
_HERMES_SYSTEM = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


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


def native_messages(messages: Messages, tools: Tools | None) -> tuple[Messages, Tools | None]:
    """For a template that renders tools: calls' arguments as objects, the tools as given
    (None: the template is not given tools)."""
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


def hermes_messages(messages: Messages, tools: Tools | None) -> tuple[Messages, None]:
    """The hermes fallback: plain roles only, so any template renders it; the template is
    given no tools (they are in the system message)."""
    out: Messages = []
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
