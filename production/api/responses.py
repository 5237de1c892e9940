"""OpenAI's Responses API (POST /v1/responses, GET /v1/responses/{id}) over the chat path.

A request is translated into the chat request it means (instructions and input items as
messages, function tools, text.format as response_format, reasoning.effort as harmony's
effort) and goes the way every chat completion goes (production.api.generation: the same
checks, prompt, grammar, conversation and stored answer); only the answer's shape differs:
output items and usage, or the Responses stream's events. So an exchange is a conversation
like any chat, rated and corrected by its answer's message id, and trained on.

Ids: a response is its stored answer, `resp_<hex>` for the message `msg_<hex>`; its message
item is `msg_<hex>` (the id feedback takes), its reasoning item `rs_<hex>`, a function call
`fc_<hex of the call id>`. Nothing else is kept: GET rebuilds the response from the message
and the request fields its record holds (generation["response"]).

previous_response_id continues the stored conversation from that answer: the prompt is the
conversation as it stood then, plus the new input. It is continued in place when that
answer is the conversation's latest and the instructions are the same; otherwise (a branch
from an earlier answer, other instructions, an input that adds assistant turns) the answer
starts a new conversation holding that history, as chat completions do with a history that
matches no stored conversation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from data.errors import NotFound
from data.models import Conversation, Message
from production.api import answers
from production.api.errors import ApiError
from production.api.generation import Prepared, Started, prepare_chat, start
from production.api.openai_schema import ChatRequest
from production.api.protocol import ResponseObject
from production.api.reasoning_token import BadToken, open_token, seal
from production.api.responses_schema import ResponsesRequest
from production.api.service import Service

log = logging.getLogger(__name__)

ENDPOINT = "responses"

# A chat request's parameter -> the Responses parameter that set it (error `param`s).
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}


def response_id(message_id: str) -> str:
    return "resp_" + message_id.removeprefix("msg_")


def message_id_of(response: str) -> str | None:
    """The stored answer of a response id; None for what is no response id."""
    if not response.startswith("resp_") or len(response) <= len("resp_"):
        return None
    return "msg_" + response.removeprefix("resp_")


def _call_item_id(call_id: str) -> str:
    return "fc_" + call_id.removeprefix("call_")


# --- the request as a chat request --------------------------------------------------------


@dataclass
class _Input:
    """The input items as chat messages, and what they say about the conversation."""

    system: list[str] = field(default_factory=list)  # leading system/developer messages
    turns: list[dict[str, Any]] = field(default_factory=list)
    adds_assistant_turns: bool = False


def _parts_text(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A message's content (a string or a list of text parts) as its text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: a string or a list of parts", param="input")
    texts = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio", "refusal"):
            raise ApiError(
                400, f"{at}: {kind} is not supported: whetstone's models read text", param="input"
            )
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise ApiError(
                400, f"{at}: expected a part of type {' or '.join(kinds)} with text", param="input"
            )
        # annotations, logprobs: an output_text echoed back; parsed: the SDK's parse helper's
        unknown = set(part) - {"type", "text", "annotations", "logprobs", "parsed"}
        if unknown:
            raise ApiError(400, f"{at}: unknown key {sorted(unknown)[0]!r}", param="input")
        texts.append(part["text"])
    return "".join(texts)


_REASONING_KEYS = {"type", "id", "summary", "content", "encrypted_content", "status"}


# parsed_arguments: the openai SDK's parse helper adds it to the items a client echoes back.
_CALL_KEYS = {"type", "call_id", "name", "arguments", "id", "status", "parsed_arguments"}


def _allowed(item: dict[str, Any], keys: set[str], where: str) -> None:
    # A key echoed back as null says nothing (the SDK's items carry every field).
    unknown = sorted(k for k in set(item) - keys if item[k] is not None)
    if unknown:
        raise ApiError(400, f"{where}: unknown key {unknown[0]!r}", param="input")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}.{key}: required, a string", param="input")
    return value


def _reasoning_text(item: dict[str, Any], where: str, service: Service) -> str:
    """A reasoning input item's text: its encrypted_content (a token this home signed, as
    Codex sends it back with store: false), else its reasoning_text content. Its summary is
    not the reasoning (from another server it is a summary indeed): never read."""
    token = item.get("encrypted_content")
    if token is not None:
        if not isinstance(token, str):
            raise ApiError(400, f"{where}.encrypted_content: a string", param="input")
        try:
            return open_token(service.reasoning_key(), token)
        except BadToken as exc:
            raise ApiError(
                400,
                f"{where}.encrypted_content: {exc}; send the reasoning item this server "
                "returned, or leave the item out",
                param="input",
            ) from None
    content = item.get("content")
    if content is None:
        return ""
    return _parts_text(content, where, ("reasoning_text",))


def _input(items: str | list[dict[str, Any]], calls: set[str], service: Service) -> _Input:
    """The input items as chat messages. `calls`: the function calls the conversation made
    so far (a previous response's); every function_call_output must answer one. A reasoning
    item's text goes with the assistant turn it leads to (reasoning_content: the harmony
    prompt keeps it before a tool call, as it keeps the model's own)."""
    read = _Input()
    if isinstance(items, str):
        read.turns.append({"role": "user", "content": items})
        return read
    assistant: dict[str, Any] | None = None  # the assistant turn being put together
    thought: list[str] = []  # reasoning items read before that turn opened

    def close() -> None:
        nonlocal assistant
        if assistant is not None:
            read.turns.append(assistant)
            assistant = None
        thought.clear()  # reasoning that led to no assistant turn leads nowhere

    def open_turn(content: str | None) -> dict[str, Any]:
        turn: dict[str, Any] = {"role": "assistant", "content": content}
        if any(thought):
            turn["reasoning_content"] = "".join(thought)
        thought.clear()
        return turn

    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            _allowed(item, {"type", "role", "content", "id", "status", "phase"}, where)
            role = item.get("role")
            if role in ("system", "developer"):
                if read.turns or assistant is not None:
                    raise ApiError(
                        400,
                        f"{where}: a {role} message may only come before the conversation "
                        "(or use instructions)",
                        param="input",
                    )
                read.system.append(_parts_text(item.get("content"), where, ("input_text",)))
            elif role == "user":
                close()
                text = _parts_text(item.get("content"), where, ("input_text",))
                read.turns.append({"role": "user", "content": text})
            elif role == "assistant":
                text = _parts_text(item.get("content"), where, ("output_text", "input_text"))
                if assistant is None:
                    assistant = open_turn(text)
                else:  # a second message item of the same turn
                    assistant["content"] = (assistant["content"] or "") + text
                read.adds_assistant_turns = True
            else:
                raise ApiError(
                    400,
                    f"{where}.role: user, assistant, system or developer; got {role!r}",
                    param="input",
                )
        elif kind == "function_call":
            _allowed(item, _CALL_KEYS, where)
            call_id = _string(item, "call_id", where)
            arguments = item.get("arguments")
            try:
                json.loads(arguments if isinstance(arguments, str) else "")
            except ValueError:
                raise ApiError(
                    400, f"{where}.arguments: must be a JSON text", param="input"
                ) from None
            if assistant is None:
                assistant = open_turn(None)
            call = {"name": _string(item, "name", where), "arguments": arguments}
            assistant.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": call}
            )
            calls.add(call_id)
            read.adds_assistant_turns = True
        elif kind == "function_call_output":
            _allowed(item, {"type", "call_id", "output", "id", "status"}, where)
            close()
            call_id = _string(item, "call_id", where)
            if call_id not in calls:
                raise ApiError(
                    400,
                    f"{where}.call_id: {call_id!r} answers no function_call of this conversation",
                    param="input",
                )
            output = _parts_text(item.get("output"), f"{where}.output", ("input_text",))
            read.turns.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            _allowed(item, _REASONING_KEYS, where)
            text = _reasoning_text(item, where, service)
            if assistant is None:
                thought.append(text)
            elif text:  # more reasoning inside the turn (before its next call)
                assistant["reasoning_content"] = assistant.get("reasoning_content", "") + text
        elif kind == "item_reference":
            raise ApiError(
                400,
                f"{where}: item_reference is not supported: send the item itself, or continue "
                "with previous_response_id",
                param="input",
            )
        else:
            raise ApiError(
                400,
                f"{where}: type {kind!r} is not supported: input takes messages, function_call, "
                "function_call_output and reasoning items",
                param="input",
            )
    close()
    return read


def _tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    """Function tools in the chat request's shape (Responses names them flat)."""
    if not req.tools:
        return None
    tools = []
    for index, tool in enumerate(req.tools):
        where = f"tools[{index}]"
        if tool.get("type") != "function":
            raise ApiError(
                400,
                f"{where}: type {tool.get('type')!r} is not supported: whetstone runs no hosted "
                "tools; declare functions (type function) and run them yourself",
                param="tools",
            )
        known = {"type", "name", "description", "parameters", "strict"}
        refused = sorted(k for k in set(tool) - known if tool[k] is not None)
        if refused:
            raise ApiError(400, f"{where}.{refused[0]} is not supported", param="tools")
        tools.append(
            {
                "type": "function",
                "function": {k: tool[k] for k in known - {"type"} if tool.get(k) is not None},
            }
        )
    return tools


def _tool_choice(req: ResponsesRequest, has_tools: bool) -> Any:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        if not has_tools and choice in (None, "auto", "none"):
            return None  # OpenAI's default; without tools it chooses nothing
        return choice
    if choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(
        400,
        f"tool_choice: {choice.get('type')!r} is not supported: none, auto, required or "
        '{"type": "function", "name": ...}',
        param="tool_choice",
    )


def _text_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt.name, "schema": fmt.schema_}
    schema |= {k: v for k, v in (("strict", fmt.strict), ("description", fmt.description)) if v}
    return {"type": "json_schema", "json_schema": schema}


def _stored_turns(conversation: Conversation, answer: Message) -> list[dict[str, Any]]:
    """The conversation as its client saw it when `answer` was given: each user and tool turn
    with its latest answer before then, `answer` last."""
    earlier = [m for m in conversation.messages if m.position <= answer.position]
    latest: dict[str | None, Message] = {}
    for m in earlier:
        if m.role == "assistant" and m.finish_reason is not None:
            latest[m.reply_to_id] = m

    def said(m: Message) -> dict[str, Any]:
        if m.role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                turn |= {"content": m.content or None, "tool_calls": m.tool_calls}
                if m.reasoning:  # the analysis before the call, as the model wrote it
                    turn["reasoning_content"] = m.reasoning
            return turn
        if m.role == "tool":
            return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
        return {"role": m.role, "content": m.content}

    turns = []
    for m in earlier:
        if m.role in ("user", "tool"):
            turns.append(said(m))
            if m.id in latest:
                turns.append(said(latest[m.id]))
        elif m.role == "assistant" and m.reply_to_id is None and m.content.strip():
            turns.append(said(m))  # an answer to no turn (a greeting)
    return turns


@dataclass
class _Previous:
    conversation: Conversation
    turns: list[dict[str, Any]]
    latest: bool  # the answer is the conversation's newest message


def _previous(service: Service, previous_id: str) -> _Previous:
    answer = _stored_response(service, previous_id, param="previous_response_id")
    if answer.finish_reason is None:
        raise ApiError(
            409,
            f"previous_response_id {previous_id} is still being generated",
            param="previous_response_id",
        )
    conversation = service.store.get_conversation(answer.conversation_id)
    latest = conversation.messages[-1].id == answer.id
    return _Previous(conversation, _stored_turns(conversation, answer), latest)


def _stored_response(service: Service, rid: str, *, param: str | None = None) -> Message:
    """The stored answer of a response id: 404 for an unknown one, one made by another
    endpoint, or one created with store: false."""
    mid = message_id_of(rid)
    try:
        if mid is None:
            raise NotFound(rid)
        message = service.store.get_message(mid)
    except NotFound:
        raise ApiError(
            404,
            f"no response {rid} (never made, or its conversation was forgotten)",
            param=param,
        ) from None
    generation = message.generation or {}
    if message.role != "assistant" or generation.get("endpoint") != ENDPOINT:
        raise ApiError(404, f"no response {rid}", param=param)
    if generation.get("response", {}).get("store") is False:
        raise ApiError(
            404,
            f"response {rid} was created with store: false: it is not kept for the Responses "
            "API (its conversation is: GET /v1/conversations)",
            param=param,
        )
    return message


def _bad_chat_request(exc: ValidationError) -> ApiError:
    """A ValidationError of the translated chat request, named in the Responses' terms."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    message = err["msg"].removeprefix("Value error, ")
    first = loc[0] if loc else message.split(" ", 1)[0]
    param = _PARAMS.get(first, first)
    for chat_name, name in _PARAMS.items():
        message = message.replace(chat_name, name)
    where = ".".join(loc).replace(first, param, 1) if loc else ""
    return ApiError(400, f"{where}: {message}" if where else message, param=param)


async def translate(service: Service, req: ResponsesRequest) -> tuple[ChatRequest, dict]:
    """The chat request a Responses request means, and the request's fields its record keeps
    (what its response object shows)."""
    if req.wants_encrypted():
        service.reasoning_key()  # a key that cannot sign refuses the request before it is answered
    previous = None
    calls: set[str] = set()
    if req.previous_response_id is not None:
        previous = await asyncio.to_thread(_previous, service, req.previous_response_id)
        for turn in previous.turns:
            calls |= {c["id"] for c in turn.get("tool_calls") or []}
    read = _input(req.input, calls, service)
    if not read.turns or read.turns[-1]["role"] not in ("user", "tool"):
        raise ApiError(
            400,
            "input must end with a user message or a function_call_output (what the answer "
            "answers)",
            param="input",
        )
    system = "\n\n".join([*([req.instructions] if req.instructions else []), *read.system])
    messages = ([{"role": "system", "content": system}] if system else []) + (
        previous.turns if previous else []
    )
    messages += read.turns
    tools = _tools(req)
    payload: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_completion_tokens": req.max_output_tokens,
        "tools": tools,
        "tool_choice": _tool_choice(req, bool(tools)),
        "parallel_tool_calls": req.parallel_tool_calls if tools else None,
        "response_format": _text_format(req),
        "reasoning_effort": req.reasoning.effort if req.reasoning else None,
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "service_tier": req.service_tier,
    }
    if previous is not None:
        same_system = (system or None) == previous.conversation.system_prompt
        if previous.latest and same_system and not read.adds_assistant_turns:
            payload["conversation_id"] = previous.conversation.id
    try:
        chat = ChatRequest.model_validate({k: v for k, v in payload.items() if v is not None})
    except ValidationError as exc:
        raise _bad_chat_request(exc) from None
    echo = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "store": req.store is not False,
        "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format
        else {"format": {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": list(req.tools or []),
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "client_metadata": req.client_metadata,
        "reasoning_summary": req.reasoning.summary_kind() if req.reasoning else None,
        "encrypted_reasoning": req.wants_encrypted(),
    }
    return chat, echo


# --- the answer as a response -------------------------------------------------------------


@dataclass
class _Answer:
    """What a response object shows of one answer, from an Outcome or the stored message."""

    message_id: str
    conversation_id: str
    created_at: int
    text: str
    reasoning: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None  # None: still being generated
    prompt_tokens: int | None
    completion_tokens: int | None
    adapter_id: str | None
    model: str
    generation: dict[str, Any]
    cached_tokens: int = 0  # the kept cache's share of the prompt


def _status(finish_reason: str | None) -> str:
    return {
        None: "in_progress",
        "stop": "completed",
        "tool_calls": "completed",
        "length": "incomplete",
        "cut_off": "cancelled",
        "cancelled": "cancelled",
        "error": "failed",
    }[finish_reason]


def _item_status(finish_reason: str | None) -> str:
    status = _status(finish_reason)
    return status if status in ("in_progress", "completed") else "incomplete"


def _message_item(message_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part],
    }


@dataclass(frozen=True)
class _Shown:
    """What the request asked to see of the reasoning item (its record keeps it, so GET
    shows the same): a summary (the reasoning itself), and the text signed as
    encrypted_content (the key: the home's)."""

    summary: bool = False
    key: bytes | None = None

    @classmethod
    def of(cls, service: Service, generation: dict[str, Any]) -> _Shown:
        asked = generation.get("response", {})
        key = service.reasoning_key() if asked.get("encrypted_reasoning") else None
        return cls(summary=bool(asked.get("reasoning_summary")), key=key)


def _reasoning_item(
    message_id: str, text: str, status: str, shown: _Shown = _Shown()
) -> dict[str, Any]:
    item = {
        "id": "rs_" + message_id.removeprefix("msg_"),
        "type": "reasoning",
        "status": status,
        "summary": [{"type": "summary_text", "text": text}] if shown.summary else [],
        "content": [{"type": "reasoning_text", "text": text}],
    }
    if shown.key is not None:
        item["encrypted_content"] = seal(shown.key, text)
    return item


def _call_item(call: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "id": _call_item_id(call["id"]),
        "type": "function_call",
        "status": status,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
    }


def _output(answer: _Answer, shown: _Shown) -> list[dict[str, Any]]:
    status = _item_status(answer.finish_reason)
    items = []
    if answer.reasoning:
        items.append(_reasoning_item(answer.message_id, answer.reasoning, status, shown))
    if answer.text or not answer.tool_calls:
        items.append(_message_item(answer.message_id, answer.text, status))
    items += [_call_item(call, "completed") for call in answer.tool_calls]
    return items


def _body(
    service: Service, answer: _Answer, output: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The response object (protocol.ResponseObject) of an answer; `output` as streamed."""
    generation = answer.generation
    asked = generation.get("response", {})
    status = _status(answer.finish_reason)
    usage = None
    if answer.prompt_tokens is not None and answer.completion_tokens is not None:
        reasoning_tokens = service.engine.count(answer.reasoning) if answer.reasoning else 0
        usage = {
            "input_tokens": answer.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": answer.cached_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": answer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "max_output_tokens"}
    elif status == "cancelled":
        incomplete = {"reason": "cancelled"}
    error = None
    if status == "failed":
        error = {"code": "server_error", "message": "generation failed; the answer is cut off"}
    body = {
        "id": response_id(answer.message_id),
        "object": "response",
        "created_at": answer.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": asked.get("instructions"),
        "max_output_tokens": asked.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": answer.model,
        "output": _output(answer, _Shown.of(service, generation)) if output is None else output,
        "parallel_tool_calls": asked.get("parallel_tool_calls", True),
        "previous_response_id": asked.get("previous_response_id"),
        "reasoning": {
            "effort": generation.get("reasoning_effort"),
            "summary": asked.get("reasoning_summary"),
        },
        "prompt_cache_key": asked.get("prompt_cache_key"),
        "service_tier": "default",
        "store": asked.get("store", True),
        "temperature": generation.get("temperature"),
        "text": asked.get("text", {"format": {"type": "text"}}),
        "tool_choice": asked.get("tool_choice", "auto"),
        "tools": asked.get("tools", []),
        "top_logprobs": None,
        "top_p": generation.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": asked.get("user"),
        "safety_identifier": asked.get("safety_identifier"),
        "metadata": asked.get("metadata", {}),
        "adapter_id": answer.adapter_id,
        "conversation_id": answer.conversation_id,
    }
    if service.settings.memory.enabled:  # as on a chat completion
        body["memory_notes"] = generation.get("memory_notes", [])
    # Through the model: a key or type gone astray fails here, not in a client.
    return ResponseObject.model_validate(body).model_dump()


def _from_message(message: Message) -> _Answer:
    adapter = message.adapter_id
    return _Answer(
        message_id=message.id,
        conversation_id=message.conversation_id,
        created_at=int(message.created_at.timestamp()),
        text=message.content,
        reasoning=message.reasoning or "",
        tool_calls=message.tool_calls or [],
        finish_reason=message.finish_reason,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        adapter_id=adapter,
        model=f"whetstone/{adapter}" if adapter else (message.base_model or ""),
        generation=message.generation or {},
        cached_tokens=message.cached_tokens or 0,
    )


def _from_outcome(started: Started, prepared: Prepared, outcome: Any) -> _Answer:
    adapter = outcome.adapter_id
    generation = outcome.settings | prepared.recorded
    return _Answer(
        message_id=started.message_id,
        conversation_id=started.conversation_id,
        created_at=started.created,
        text=outcome.text,
        reasoning=outcome.reasoning,
        tool_calls=[c.as_openai() for c in outcome.tool_calls],
        finish_reason="cut_off" if outcome.finish_reason == "cancelled" else outcome.finish_reason,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        adapter_id=adapter,
        model=f"whetstone/{adapter}" if adapter else started.model,
        generation=generation,
        cached_tokens=outcome.cached_tokens,
    )


# --- the routes' work ---------------------------------------------------------------------


def _renamed(exc: ApiError) -> ApiError:
    """An error of the chat path in the Responses' terms (its param, and the name in its
    message)."""
    param = _PARAMS.get(exc.param or "", exc.param)
    message = exc.message
    for chat_name, name in _PARAMS.items():
        message = message.replace(f"{chat_name}:", f"{name}:").replace(f"{chat_name} ", f"{name} ")
    renamed = ApiError(exc.status, message, param=param, code=exc.code, **exc.headers)
    return renamed


async def create(service: Service, req: ResponsesRequest, request: Request) -> Response:
    """POST /v1/responses."""
    chat, echo = await translate(service, req)
    try:
        prepared = await prepare_chat(service, chat, {"endpoint": ENDPOINT, "response": echo})
    except ApiError as exc:
        raise _renamed(exc) from None
    started = await start(service, prepared)
    if req.stream:
        return StreamingResponse(
            _events(service, started, prepared),
            media_type="text/event-stream",
            headers=started.headers | {"Cache-Control": "no-cache"},
        )
    outcome = await answers.collect(started.job, started.recorder, request)
    body = _body(service, _from_outcome(started, prepared, outcome))
    return JSONResponse(body, headers=started.headers)


async def retrieve(service: Service, rid: str) -> dict[str, Any]:
    """GET /v1/responses/{id}: the stored response (in_progress while it is generated)."""
    message = await asyncio.to_thread(_stored_response, service, rid)
    return _body(service, _from_message(message))


def _sse(kind: str, sequence: int, fields: dict[str, Any]) -> str:
    body = {"type": kind, "sequence_number": sequence} | fields
    return f"event: {kind}\ndata: {json.dumps(body)}\n\n"


async def _events(service: Service, started: Started, prepared: Prepared) -> AsyncIterator[str]:
    """The Responses stream of one answer: response.created and .in_progress, each output
    item added, its deltas (reasoning text, output text, a call's arguments whole) and done,
    then response.completed (.incomplete at max_output_tokens, .failed on an error). Items
    open in the order their first delta comes and are finished when the answer is."""
    job, recorder = started.job, started.recorder
    shown = _Shown.of(service, prepared.recorded)
    sequence = 0
    items: list[dict[str, Any]] = []
    text_at: int | None = None  # where the message item is in items, once opened
    reasoning_at: int | None = None
    said: dict[str, list[str]] = {"text": [], "reasoning": []}

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return _sse(kind, sequence - 1, fields)

    def in_progress() -> dict[str, Any]:
        answer = _Answer(
            message_id=started.message_id,
            conversation_id=started.conversation_id,
            created_at=started.created,
            text="",
            reasoning="",
            tool_calls=[],
            finish_reason=None,
            prompt_tokens=None,
            completion_tokens=None,
            adapter_id=recorder.adapter_id,
            model=started.model,
            generation=service.engine.resolved_settings(prepared.sampling) | prepared.recorded,
        )
        return _body(service, answer, output=[])

    def open_message() -> list[str]:
        nonlocal text_at
        text_at = len(items)
        items.append(_message_item(started.message_id, "", "in_progress") | {"content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            event("response.output_item.added", output_index=text_at, item=items[text_at]),
            event(
                "response.content_part.added",
                item_id=started.message_id,
                output_index=text_at,
                content_index=0,
                part=part,
            ),
        ]

    def open_reasoning() -> list[str]:
        nonlocal reasoning_at
        reasoning_at = len(items)
        items.append(_reasoning_item(started.message_id, "", "in_progress") | {"content": []})
        opened = [
            event("response.output_item.added", output_index=reasoning_at, item=items[-1]),
            event(
                "response.content_part.added",
                item_id=items[-1]["id"],
                output_index=reasoning_at,
                content_index=0,
                part={"type": "reasoning_text", "text": ""},
            ),
        ]
        if shown.summary:  # the summary is the same text: its one part opens with it
            opened.append(
                event(
                    "response.reasoning_summary_part.added",
                    item_id=items[-1]["id"],
                    output_index=reasoning_at,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            )
        return opened

    def close(status: str) -> list[str]:
        """Finish the open text and reasoning items, in output order."""
        out = []
        for index in sorted(i for i in (text_at, reasoning_at) if i is not None):
            if index == text_at:
                text = "".join(said["text"])
                items[index] = _message_item(started.message_id, text, status)
                part = items[index]["content"][0]
                kind, delta_done = "response.output_text.done", {"text": text, "logprobs": []}
            else:
                text = "".join(said["reasoning"])
                items[index] = _reasoning_item(started.message_id, text, status, shown)
                part = items[index]["content"][0]
                kind, delta_done = "response.reasoning_text.done", {"text": text}
            where = {"item_id": items[index]["id"], "output_index": index, "content_index": 0}
            out.append(event(kind, **where, **delta_done))
            out.append(event("response.content_part.done", **where, part=part))
            if index == reasoning_at and shown.summary:
                summary = {"item_id": items[index]["id"], "output_index": index, "summary_index": 0}
                out.append(event("response.reasoning_summary_text.done", **summary, text=text))
                out.append(
                    event(
                        "response.reasoning_summary_part.done",
                        **summary,
                        part=items[index]["summary"][0],
                    )
                )
            out.append(event("response.output_item.done", output_index=index, item=items[index]))
        return out

    try:
        yield event("response.created", response=in_progress())
        yield event("response.in_progress", response=in_progress())
        while True:
            kind, payload = await job.events.get()
            if kind == "start":
                recorder.adapter_id = payload
            elif kind == "delta":
                recorder.add(payload)
                if payload.reasoning:
                    if reasoning_at is None:
                        for line in open_reasoning():
                            yield line
                    said["reasoning"].append(payload.reasoning)
                    yield event(
                        "response.reasoning_text.delta",
                        item_id=items[reasoning_at]["id"],
                        output_index=reasoning_at,
                        content_index=0,
                        delta=payload.reasoning,
                    )
                    if shown.summary:
                        yield event(
                            "response.reasoning_summary_text.delta",
                            item_id=items[reasoning_at]["id"],
                            output_index=reasoning_at,
                            summary_index=0,
                            delta=payload.reasoning,
                        )
                if payload.text:
                    if text_at is None:
                        for line in open_message():
                            yield line
                    said["text"].append(payload.text)
                    yield event(
                        "response.output_text.delta",
                        item_id=started.message_id,
                        output_index=text_at,
                        content_index=0,
                        delta=payload.text,
                        logprobs=[],
                    )
                for call in payload.tool_calls:
                    # One call comes whole (as in chat completions): added, its arguments
                    # in one delta, done.
                    index = len(items)
                    done = _call_item(call.as_openai(), "completed")
                    items.append(done)
                    added = done | {"status": "in_progress", "arguments": ""}
                    where = {"item_id": done["id"], "output_index": index}
                    yield event("response.output_item.added", output_index=index, item=added)
                    yield event(
                        "response.function_call_arguments.delta", **where, delta=call.arguments
                    )
                    yield event(
                        "response.function_call_arguments.done",
                        **where,
                        name=call.name,
                        arguments=call.arguments,
                    )
                    yield event("response.output_item.done", output_index=index, item=done)
            elif kind == "done":
                await recorder.done(payload)
                answer = _from_outcome(started, prepared, payload)
                status = _item_status(answer.finish_reason)
                if text_at is None and not payload.tool_calls:
                    for line in open_message():  # an empty answer is an empty message
                        yield line
                for line in close(status):
                    yield line
                body = _body(service, answer, output=items)
                final = {
                    "completed": "response.completed",
                    "incomplete": "response.incomplete",
                }.get(body["status"], "response.failed")
                yield event(final, response=body)
                return
            elif kind == "error":
                await answers.stored(recorder.cut_off("error"))
                _, message = answers.failure(payload)
                log.error("response %s failed: %s", started.message_id, message)
                for line in close("incomplete"):
                    yield line
                failed = in_progress() | {
                    "status": "failed",
                    "output": items,
                    "error": {"code": "server_error", "message": message},
                }
                yield event("response.failed", response=failed)
                return
    finally:
        # Client gone (the task is cancelled or the generator closed): synchronous only.
        if not recorder.finished:
            job.cancel()
            recorder.cut_off()
