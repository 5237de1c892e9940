"""One answer's OpenAI pieces (finish_reason, usage, logprobs, system_fingerprint), the
Recorder that keeps its stored message in step with generation, and the wait for a whole
(non-streamed) answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request

from production.api.errors import ApiError
from production.api.service import Service

if TYPE_CHECKING:
    from production.engine import Outcome

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0


def fingerprint(adapter_id: str | None) -> str:
    return f"whetstone-{adapter_id or 'base'}"


def finish(outcome: Outcome) -> str:
    if outcome.finish_reason in ("length", "tool_calls"):
        return outcome.finish_reason
    return "stop"


def usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _token_text(engine: Any, token: int) -> str:
    return engine.tokenizer.decode([token])


def logprobs(engine: Any, entries: list[Any] | None, kind: str) -> dict[str, Any] | None:
    """OpenAI's logprobs object: chat's {content: [...]} or completions' parallel lists."""
    if entries is None:
        return None
    if kind == "chat":
        content = []
        for e in entries:
            text = _token_text(engine, e.token)
            content.append(
                {
                    "token": text,
                    "logprob": e.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := _token_text(engine, i)),
                            "logprob": v,
                            "bytes": list(t.encode()),
                        }
                        for i, v in e.top
                    ],
                }
            )
        return {"content": content, "refusal": None}
    tokens = [_token_text(engine, e.token) for e in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(engine, i): v for i, v in e.top} for e in entries],
        "text_offset": offsets,
    }


class Recorder:
    """Keeps the stored answer in step with the stream: flushes, finishes, or cuts off. The
    writes go to the service's one writer thread, in order; `done` returns the awaitable of
    the finishing write, so a client is answered only once its answer is stored."""

    def __init__(self, service: Service, message_id: str, started: float) -> None:
        self.service = service
        self.message_id = message_id
        self.started = started
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.adapter_id: str | None = None
        self.last_flush = started
        self.finished = False

    def add(self, delta: Any) -> None:
        self.text.append(delta.text)
        self.reasoning.append(delta.reasoning)
        now = time.monotonic()
        if now - self.last_flush >= FLUSH_EVERY_S:
            self.last_flush = now
            self._write(
                self.service.store.save_partial,
                self.message_id,
                "".join(self.text),
                reasoning="".join(self.reasoning) or None,
            )

    def _write(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        # Not awaited where the client is gone (a cancelled task, a closed generator): a
        # failed write is logged here, never lost silently.
        future = self.service.writes.submit(fn, *args, **kwargs)
        future.add_done_callback(self._log_failure)
        return future

    def _log_failure(self, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("storing answer %s failed: %s", self.message_id, future.exception())

    def done(self, outcome: Outcome) -> asyncio.Future[Any]:
        self.finished = True
        self.service.served += 1
        cut = outcome.finish_reason == "cancelled"
        calls = [c.as_openai() for c in outcome.tool_calls] or None
        return asyncio.wrap_future(
            self._write(
                self.service.store.complete_message,
                self.message_id,
                content=outcome.text,
                finish_reason="cut_off" if cut else outcome.finish_reason,
                reasoning=outcome.reasoning or None,
                adapter_id=outcome.adapter_id,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                cached_tokens=outcome.cached_tokens,
                latency_ms=round(outcome.seconds * 1000, 1),
                ttft_ms=None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 1),
                tool_calls=calls,
            )
        )

    def cut_off(self, reason: str = "cut_off") -> concurrent.futures.Future[Any] | None:
        """Client gone or generation failed: keep what was said so far (the write, to await
        where the client still waits; None when the answer was already finished)."""
        if self.finished:
            return None
        self.finished = True
        return self._write(
            self.service.store.complete_message,
            self.message_id,
            content="".join(self.text),
            finish_reason=reason,
            reasoning="".join(self.reasoning) or None,
            adapter_id=self.adapter_id,
            latency_ms=round((time.monotonic() - self.started) * 1000, 1),
        )


def failure(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message of a generation that ended in `error`: the server stopping
    is a 503 to retry, anything else a 500."""
    from production.worker import WorkerStopped

    if isinstance(error, WorkerStopped):
        return 503, f"not answered: {error}; retry in a moment"
    return 500, f"generation failed: {error}"


async def stored(write: concurrent.futures.Future[Any] | None) -> None:
    if write is not None:
        await asyncio.wrap_future(write)


async def collect(job: Any, recorder: Recorder, request: Request) -> Outcome:
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    recorder.cut_off()
                    raise ApiError(499, "client disconnected") from None
                continue
            if kind == "start":
                recorder.adapter_id = payload
            elif kind == "delta":
                recorder.add(payload)
            elif kind == "done":
                await recorder.done(payload)
                return payload
            elif kind == "error":
                await stored(recorder.cut_off("error"))
                raise ApiError(*failure(payload))
    finally:
        if not recorder.finished:
            job.cancel()
            recorder.cut_off()
