"""The OpenAI endpoints that generate: chat completions and (raw-text) completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from production.api import generation
from production.api.errors import sends
from production.api.openai_schema import ChatRequest, CompletionRequest
from production.api.protocol import ChatCompletion, TextCompletion
from production.api.service import ServiceDep

router = APIRouter()

# stream: true answers with server-sent events instead (OpenAI's streaming format).
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
}


# 410: the conversation_id named was forgotten.
@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=_STREAMED | sends(400, 404, 410, 503),
)
async def chat(req: ChatRequest, request: Request, service: ServiceDep) -> Response:
    return await generation.chat(service, req, request)


@router.post(
    "/v1/completions",
    response_model=TextCompletion,
    responses=_STREAMED | sends(400, 404, 503),
)
async def completions(req: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    return await generation.complete(service, req, request)
