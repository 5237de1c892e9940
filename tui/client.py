"""The TUI's only way to the daemon: HTTP to the API worker, found through the home.

The worker records its address in `<home>/run/server.json` when it starts; the address is
looked up again on every request, so a daemon started (or restarted on another port) after
the TUI still gets found. Without a record, the configured host:port is tried.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from common.config import Settings

# Short: a request to a worker that is down should fail fast and let the retry loop work.
CONNECT_TIMEOUT_S = 3.0
# Generation of a long answer can take minutes; time between stream chunks is what matters.
READ_TIMEOUT_S = 120.0


class DaemonUnreachable(Exception):
    """Nothing answers at the daemon's address (not started, restarting, or gone)."""


class ApiRefused(Exception):
    """The daemon answered with an error; `message` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


# ------------------------------------------------------------------------- finding it


def home_locator(settings: Settings) -> tuple[Callable[[], str], str | None]:
    """(a function giving the worker's current URL, the bearer token) for a home."""
    configured = settings.server.local_url

    def locate() -> str:
        url = (settings.paths.server_record() or {}).get("url")
        return str(url) if url else configured

    return locate, settings.bearer_token()


# ----------------------------------------------------------------------- chat events


@dataclass
class Started:
    message_id: str
    conversation_id: str | None


@dataclass
class Delta:
    text: str
    reasoning: str


@dataclass
class Finished:
    finish_reason: str
    adapter_id: str | None
    completion_tokens: int | None
    seconds: float


# ------------------------------------------------------------------------- the client


class Api:
    """Async client for the worker's HTTP API; every method raises DaemonUnreachable or
    ApiRefused instead of httpx's errors, so screens handle two cases, not twenty."""

    def __init__(self, locate: Callable[[], str], token: str | None = None) -> None:
        self._locate = locate
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)

    @property
    def url(self) -> str:
        return self._locate().rstrip("/")

    async def close(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.url + path
        try:
            response = await self._client.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no answer from {url}: {_why(exc)}") from exc
        if response.status_code >= 400:
            raise ApiRefused(response.status_code, _error_message(response))
        return response.json()

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health")

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def trend(self, weeks: int = 4) -> dict[str, Any]:
        return await self.request("GET", f"/v1/trend?weeks={weeks}")

    async def conversations(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/conversations"))["data"]

    async def search_conversations(self, q: str, limit: int = 50) -> list[dict[str, Any]]:
        """Conversations whose messages or title hold the words of `q`, newest first, each
        with the `snippet` that matched."""
        query = urlencode({"q": q, "limit": limit})
        return (await self.request("GET", f"/v1/conversations?{query}"))["data"]

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/conversations/{conversation_id}")

    async def update_conversation(self, conversation_id: str, **fields: Any) -> dict[str, Any]:
        return await self.request("PATCH", f"/v1/conversations/{conversation_id}", fields)

    async def forget_conversation(self, conversation_id: str) -> None:
        await self.request("DELETE", f"/v1/conversations/{conversation_id}")

    async def memory(self) -> dict[str, Any]:
        """The memory's notes, newest first (`data`), and whether they are given to the
        model (`enabled`)."""
        return await self.request("GET", "/v1/memory?limit=500")

    async def forget_note(self, note_id: str) -> None:
        await self.request("DELETE", f"/v1/memory/{note_id}")

    async def feedback(self, message_id: str, **fields: Any) -> dict[str, Any]:
        return await self.request("POST", "/v1/feedback", {"message_id": message_id, **fields})

    async def candidates(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/candidates"))["data"]

    async def candidate(self, candidate_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/candidates/{candidate_id}")

    async def promote(self, candidate_id: str, *, force: bool = False) -> dict[str, Any]:
        return await self.request(
            "POST", f"/v1/candidates/{candidate_id}/promote", {"force": force}
        )

    async def rollback(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/rollback")

    async def train(self, *, force: bool = True) -> dict[str, Any]:
        return await self.request("POST", "/v1/train", {"force": force})

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[Started | Delta | Finished]:
        """POST a streamed chat completion; yields Started once the answer is stored, then
        Deltas, then Finished. A broken connection raises DaemonUnreachable mid-stream."""
        url = self.url + "/v1/chat/completions"
        body = body | {"stream": True, "stream_options": {"include_usage": True}}
        started = time.monotonic()
        finish: tuple[str, str | None] | None = None
        tokens: int | None = None
        try:
            async with self._client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise ApiRefused(response.status_code, _error_message(response))
                yield Started(
                    response.headers.get("x-whetstone-message-id", ""),
                    response.headers.get("x-whetstone-conversation-id"),
                )
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ApiRefused(500, chunk["error"].get("message", str(chunk)))
                    if chunk.get("usage"):
                        tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices", []):
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or ""
                        reasoning = delta.get("reasoning_content") or ""
                        if text or reasoning:
                            yield Delta(text, reasoning)
                        if choice.get("finish_reason"):
                            finish = (choice["finish_reason"], chunk.get("adapter_id"))
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"lost the daemon at {url}: {_why(exc)}") from exc
        if finish is None:
            raise DaemonUnreachable(f"the answer from {url} ended without finishing")
        yield Finished(finish[0], finish[1], tokens, time.monotonic() - started)


def _why(exc: httpx.TransportError) -> str:
    return str(exc) or type(exc).__name__


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:300] or response.reason_phrase
