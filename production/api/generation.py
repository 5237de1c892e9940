"""Chat and text completions: a request checked and turned into a prompt and the engine's
sampling, its exchange stored, and the answer sent whole or streamed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from production.api import answers, memory
from production.api.errors import ApiError
from production.api.model_ids import check_model, served_model
from production.api.openai_schema import ChatMessage, ChatRequest, CompletionRequest
from production.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    TextChoice,
    TextCompletion,
)
from production.api.service import Service
from production.api.streaming import ChatChunks, TextChunks, sse
from production.api.turns import system_and_body, turns_of

# The temperature of a regenerated answer when the request names none.
REGENERATE_TEMPERATURE = 0.8


def _sampling(
    service: Service,
    req: Any,
    max_tokens: int,
    *,
    grammar: Any = None,
    logprobs: int | None = None,
    **more: Any,
) -> Any:
    """The engine's Sampling for a chat or completions request (`more`: tools, raw)."""
    from production.decode.steering import SteeringSpec
    from production.engine import Sampling

    bias = []
    for token, value in (req.logit_bias or {}).items():
        if int(token) >= service.engine.vocab_size:
            raise ApiError(
                400,
                f"logit_bias: token {token} is past the vocabulary ({service.engine.vocab_size})",
                param="logit_bias",
            )
        bias.append((int(token), float(value)))
    temperature = req.temperature
    if temperature is None and getattr(req, "regenerate", False):
        # Another answer to the same message: greedy decoding would give the same one again,
        # and the two are a pair to learn from only if they can differ.
        temperature = REGENERATE_TEMPERATURE
    steering = SteeringSpec(
        logit_bias=tuple(bias),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        grammar=grammar,
    )
    return Sampling(
        temperature,
        req.top_p,
        req.top_k,
        max_tokens,
        req.seed,
        stop=req.stop_strings(),
        steering=steering,
        **more,
    )


def _answer_grammar(
    engine: Any, req: ChatRequest, tools: list[dict[str, Any]] | None, max_tokens: int
) -> Any:
    """What the answer must match: the tools' call format, or the response_format (None:
    free text), in the shape of the engine's chat format. Harmony models may think first, on
    at most half of max_tokens. Schemas go through json_schema.for_grammar: what the grammar
    would ignore is refused by name."""
    from production.decode import answer_grammar, json_schema

    shape = engine.format.answer_shape
    if tools:
        enforced = []
        for tool in tools:
            function = tool["function"]
            if function.get("parameters") is not None:
                try:
                    parameters = json_schema.for_grammar(function["parameters"])
                except json_schema.SchemaError as exc:
                    raise json_schema.SchemaError(
                        f"{function['name']}'s parameters: {exc}"
                    ) from None
                function = function | {"parameters": parameters}
            enforced.append(tool | {"function": function})
        choice = req.tool_choice or "auto"
        if not isinstance(choice, str):
            choice = choice.model_dump()
        parallel = req.parallel_tool_calls is not False
        return answer_grammar.tool_calls(shape, enforced, choice, parallel, max_tokens // 2)
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    # json_object, or json_schema without a schema: any JSON object
    schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
    if schema is not None:
        schema = json_schema.for_grammar(schema)
    strict = bool(rf.json_schema and rf.json_schema.strict)
    return answer_grammar.json_answer(shape, schema, strict, max_tokens // 2)


@dataclass(frozen=True)
class Prepared:
    """A chat request made ready to generate: its prompt and sampling, and where its answer
    is stored (the conversation, the turn it answers, what its record keeps)."""

    prompt: list[int]
    sampling: Any
    conversation_id: str
    asked_id: str
    recorded: dict[str, Any]
    memory_notes: list[str] = field(default_factory=list)  # ids of the notes in the prompt


async def chat(service: Service, req: ChatRequest, request: Request) -> Response:
    """POST /v1/chat/completions."""
    prepared = await prepare_chat(service, req)
    return await _generate(
        service,
        request,
        prepared,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        include_reasoning=req.include_reasoning,
        kind="chat",
    )


def _with_analysis(turn: dict[str, Any], message: ChatMessage) -> dict[str, Any]:
    """The turn as the chat template takes it: an assistant's tool call keeps the analysis
    that led to it (harmony's rule: GPT-OSS's template renders `thinking` before a call, and
    refuses it beside content, which it renders as that analysis instead). Only the
    template sees it: the stored turn is the same either way."""
    if turn.get("tool_calls") and not turn["content"] and message.reasoning_content:
        return turn | {"thinking": message.reasoning_content}
    return turn


async def prepare_chat(
    service: Service, req: ChatRequest, recorded: dict[str, Any] | None = None
) -> Prepared:
    """Check a chat request, render its prompt, compile its grammar and store its new turns
    (the conversation it continues, or a new one): everything before generation, shared by
    chat completions and the Responses API (which translates its requests into this one).
    `recorded`: more for the answer's record."""
    from production.decode.steering import GrammarError

    engine = service.engine
    check_model(service, req.model)
    system, turns = turns_of(req.messages)
    _, body = system_and_body(req.messages)
    if req.memory and not service.settings.memory.enabled:
        raise ApiError(
            400,
            "memory: the memory is off (memory.enabled = false in the config); "
            "send no memory field, or turn it on",
            param="memory",
        )
    notes = (
        await asyncio.to_thread(
            memory.choose,
            service.store,
            service.settings.memory,
            turns,
            engine.count,
            engine.adapter_id,
        )
        # off: no thread hop on every chat request
        if service.settings.memory.enabled and req.memory is not False
        else []
    )
    # The notes join the prompt only: service.thread stores the request's own turns.
    system, template_turns = memory.with_notes(
        engine.format.name,
        system,
        [_with_analysis(turn, message) for turn, message in zip(turns, body, strict=True)],
        notes,
    )
    prompt_messages = ([{"role": "system", "content": system}] if system else []) + template_turns
    window = engine.context_window
    chars = sum(len(m["content"]) for m in prompt_messages)
    most = window * await asyncio.to_thread(engine.longest_token_chars)
    if chars > most:
        raise ApiError(
            400,
            f"the prompt is {chars} characters; no more than {most} fit in the context window "
            f"of {window} tokens (model.context_window): shorten the conversation",
            param="messages",
        )
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    template_messages, template_tools = engine.format.template_messages(prompt_messages, tools)

    def render(effort: str | None) -> list[int]:
        return engine.prompt_ids(template_messages, effort, template_tools)

    # Off the event loop: tokenising a long prompt takes long enough to miss /health.
    prompt = await asyncio.to_thread(render, req.reasoning_effort)
    if len(prompt) >= window:
        raise ApiError(
            400,
            f"the prompt is {len(prompt)} tokens; the context window is {window} "
            "(model.context_window): shorten the conversation",
            param="messages",
        )
    requested = req.max_completion_tokens or req.max_tokens
    if requested is not None and requested > window:
        raise ApiError(400, f"max_tokens must be between 1 and {window}", param="max_tokens")
    max_tokens = min(requested or 512, window - len(prompt))
    grammar_param = "tools" if tools else "response_format"
    try:  # compiled here so a bad schema is a 400; the worker then finds it cached
        grammar = _answer_grammar(engine, req, tools, max_tokens)
        if grammar is not None:
            await asyncio.to_thread(engine.grammars.compile, grammar)
    except (GrammarError, ValueError) as exc:  # xgrammar's tool-format builder: ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApiError(
            400, f"{grammar_param}: the schema cannot be used: {reason}", param=grammar_param
        ) from None
    sampling = _sampling(
        service,
        req,
        max_tokens,
        grammar=grammar,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        tools=bool(tools),
    )
    if service.worker.waiting >= service.worker.max_queue:
        raise ApiError(503, "the model is busy: too many requests waiting", **{"Retry-After": "5"})

    conversation, asked_id = await asyncio.to_thread(service.thread, req)
    effort = req.reasoning_effort or conversation.reasoning_effort
    if effort != req.reasoning_effort:
        # The conversation's own effort (set by PATCH) is what the answer is made with.
        prompt = await asyncio.to_thread(render, effort)
        room = max(1, window - len(prompt))
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))
    record: dict[str, Any] = dict(recorded or {})
    if effort:
        record["reasoning_effort"] = effort
    if req.tools:
        record["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        record["tool_choice"] = (
            req.tool_choice.model_dump()
            if hasattr(req.tool_choice, "model_dump")
            else req.tool_choice
        )
    if req.response_format is not None:
        record["response_format"] = req.response_format.model_dump(by_alias=True, exclude_none=True)
    record |= req.recorded()
    used = [hit.note.id for hit in notes]
    if used:
        record["memory_notes"] = used
    return Prepared(prompt, sampling, conversation.id, asked_id, record, used)


async def complete(service: Service, req: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions: the prompt as raw text (no chat template), logged like chat (a
    conversation holding the prompt as the user turn and the completion as the answer)."""

    engine = service.engine
    check_model(service, req.model)
    text = req.text()
    window = engine.context_window
    if len(text) > window * await asyncio.to_thread(engine.longest_token_chars):
        raise ApiError(400, "the prompt does not fit in the context window", param="prompt")
    prompt = await asyncio.to_thread(
        lambda: engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    )
    if not prompt or len(prompt) >= window:
        raise ApiError(
            400,
            f"the prompt is {len(prompt)} tokens; it must be 1..{window - 1} "
            "(model.context_window)",
            param="prompt",
        )
    if req.max_tokens is not None and req.max_tokens > window:
        raise ApiError(400, f"max_tokens must be between 1 and {window}", param="max_tokens")
    # OpenAI's default for this endpoint is 16 tokens.
    max_tokens = min(req.max_tokens or 16, window - len(prompt))
    sampling = _sampling(service, req, max_tokens, logprobs=req.logprobs, raw=True)
    if service.worker.waiting >= service.worker.max_queue:
        raise ApiError(503, "the model is busy: too many requests waiting", **{"Retry-After": "5"})

    def start() -> tuple[str, str]:
        conversation = service.store.create_conversation(system_prompt=None, title=text[:60])
        user = service.store.add_message(conversation.id, "user", text)
        return conversation.id, user.id

    conversation_id, asked_id = await asyncio.to_thread(start)
    recorded: dict[str, Any] = {"endpoint": "completions"}
    recorded |= req.recorded()
    return await _generate(
        service,
        request,
        Prepared(prompt, sampling, conversation_id, asked_id, recorded),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        include_reasoning=False,
        kind="text",
    )


@dataclass
class Started:
    """A generation under way: its job on the worker, the Recorder keeping its stored answer
    in step, and what every answer's body and headers name."""

    job: Any
    recorder: answers.Recorder
    message_id: str
    conversation_id: str
    created: int
    model: str
    headers: dict[str, str]


async def start(service: Service, prepared: Prepared) -> Started:
    """Store the answer's placeholder and submit the generation (503 when the queue is full
    or the worker stopped: the placeholder is finished as an error, nothing is lost)."""
    from production.worker import QueueFull, WorkerStopped

    engine = service.engine
    placeholder = await asyncio.to_thread(
        service.store.add_message,
        prepared.conversation_id,
        "assistant",
        "",
        reply_to_id=prepared.asked_id,
        adapter_id=engine.adapter_id,
        base_model=engine.base_model_name,
        generation=engine.resolved_settings(prepared.sampling) | prepared.recorded,
    )
    try:
        job = service.worker.submit(prepared.prompt, prepared.sampling)
    except (QueueFull, WorkerStopped) as exc:
        await asyncio.to_thread(
            service.store.complete_message, placeholder.id, content="", finish_reason="error"
        )
        why = "the model is busy" if isinstance(exc, QueueFull) else "not answered"
        raise ApiError(503, f"{why}: {exc}", **{"Retry-After": "5"}) from None
    return Started(
        job=job,
        recorder=answers.Recorder(service, placeholder.id, time.monotonic()),
        message_id=placeholder.id,
        conversation_id=prepared.conversation_id,
        # The stored answer's time: GET /v1/responses/{id} reads it back.
        created=int(placeholder.created_at.timestamp()),
        model=served_model(engine),
        headers={
            "X-Whetstone-Message-Id": placeholder.id,
            "X-Whetstone-Conversation-Id": prepared.conversation_id,
        },
    )


async def _generate(
    service: Service,
    request: Request,
    prepared: Prepared,
    *,
    stream: bool,
    include_usage: bool,
    include_reasoning: bool,
    kind: Literal["chat", "text"],
) -> Response:
    engine = service.engine
    sampling = prepared.sampling
    started = await start(service, prepared)
    job, recorder, headers = started.job, started.recorder, started.headers
    base = {
        "id": started.message_id,
        "created": started.created,
        "model": started.model,
        "system_fingerprint": answers.fingerprint(engine.adapter_id),
    }
    extra: dict[str, Any] = {"conversation_id": started.conversation_id}
    if kind == "chat" and service.settings.memory.enabled:
        extra["memory_notes"] = prepared.memory_notes
    wants_logprobs = sampling.steering.logprobs is not None
    if stream:
        logprobs_of = (
            (lambda o: answers.logprobs(engine, o.logprobs, kind)) if wants_logprobs else None
        )
        chunks = ChatChunks(include_reasoning) if kind == "chat" else TextChunks()
        return StreamingResponse(
            sse(job, recorder, base, extra, include_usage, chunks, logprobs_of),
            media_type="text/event-stream",
            headers=headers | {"Cache-Control": "no-cache"},
        )
    outcome = await answers.collect(job, recorder, request)
    base["system_fingerprint"] = answers.fingerprint(outcome.adapter_id)
    logprobs = answers.logprobs(engine, outcome.logprobs, kind) if wants_logprobs else None
    answered = {"usage": answers.usage(outcome), "adapter_id": outcome.adapter_id} | extra
    finish = answers.finish(outcome)
    body: ChatCompletion | TextCompletion
    if kind == "text":
        choice = TextChoice(index=0, text=outcome.text, logprobs=logprobs, finish_reason=finish)
        body = TextCompletion(**base, object="text_completion", choices=[choice], **answered)
    else:
        said: dict[str, Any] = {"content": outcome.text}
        if outcome.tool_calls:
            calls = [c.as_openai() for c in outcome.tool_calls]
            said = {"content": outcome.text or None, "tool_calls": calls}
        if include_reasoning:
            said["reasoning_content"] = outcome.reasoning
        message = AssistantMessage(role="assistant", **said)
        choice = ChatChoice(index=0, message=message, logprobs=logprobs, finish_reason=finish)
        body = ChatCompletion(**base, object="chat.completion", choices=[choice], **answered)
    # A JSONResponse, not the model returned: the answer's headers name its message and
    # conversation.
    return JSONResponse(body.model_dump(), headers=headers)
