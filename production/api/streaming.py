"""Server-sent events: OpenAI's streamed chunks for chat and completions answers, kept in
step with the stored message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from production.api import answers
from production.api.errors import error_body

if TYPE_CHECKING:
    from production.engine import Outcome


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


class ChatChunks:
    """chat.completion.chunk choices. A tool call is one delta carrying its whole arguments;
    log-probs come with the finishing chunk (the engine reports them per answer)."""

    object = "chat.completion.chunk"

    def __init__(self, include_reasoning: bool) -> None:
        self.include_reasoning = include_reasoning
        self.calls_sent = 0

    def opening(self) -> dict[str, Any] | None:
        return self.choice({"role": "assistant", "content": ""})

    @staticmethod
    def choice(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, payload: Any) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if payload.text:
            delta["content"] = payload.text
        if self.include_reasoning and payload.reasoning:
            delta["reasoning_content"] = payload.reasoning
        if payload.tool_calls:
            delta["tool_calls"] = [
                c.as_openai(self.calls_sent + i) for i, c in enumerate(payload.tool_calls)
            ]
            self.calls_sent += len(payload.tool_calls)
        return self.choice(delta) if delta else None

    def finish(self, outcome: Outcome, logprobs: Any) -> dict[str, Any]:
        return self.choice({}, answers.finish(outcome), logprobs)


class TextChunks:
    """text_completion choices (POST /v1/completions)."""

    object = "text_completion"

    def opening(self) -> dict[str, Any] | None:
        return None

    @staticmethod
    def choice(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, payload: Any) -> dict[str, Any] | None:
        return self.choice(payload.text) if payload.text else None

    def finish(self, outcome: Outcome, logprobs: Any) -> dict[str, Any]:
        return self.choice("", answers.finish(outcome), logprobs)


async def sse(
    job: Any,
    recorder: answers.Recorder,
    base: dict[str, Any],
    extra: dict[str, Any],
    include_usage: bool,
    chunks: ChatChunks | TextChunks,
    logprobs_of: Any,
) -> AsyncIterator[str]:
    """OpenAI's server-sent events for one answer, chat or completions (`chunks`)."""

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        return _data(base | {"object": chunks.object, "choices": choices} | extra | more)

    try:
        opening = chunks.opening()
        if opening is not None:
            yield event([opening])
        while True:
            kind, payload = await job.events.get()
            if kind == "start":
                recorder.adapter_id = payload
                base["system_fingerprint"] = answers.fingerprint(payload)
            elif kind == "delta":
                recorder.add(payload)
                choice = chunks.delta(payload)
                if choice is not None:
                    yield event([choice])
            elif kind == "done":
                await recorder.done(payload)
                logprobs = logprobs_of(payload) if logprobs_of else None
                yield event([chunks.finish(payload, logprobs)], adapter_id=payload.adapter_id)
                if include_usage:
                    yield event([], usage=answers.usage(payload))
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                await answers.stored(recorder.cut_off("error"))
                status, message = answers.failure(payload)
                yield _data(error_body(message, status))
                return
    finally:
        # Client gone (the task is cancelled or the generator closed): synchronous only.
        if not recorder.finished:
            job.cancel()
            recorder.cut_off()
