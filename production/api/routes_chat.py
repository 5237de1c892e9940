"""The OpenAI endpoints that generate: chat completions, (raw-text) completions and the
Responses API (a stored response read back too)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from production.api import generation, responses
from production.api.errors import sends
from production.api.openai_schema import ChatRequest, CompletionRequest
from production.api.protocol import ChatCompletion, ResponseObject, TextCompletion
from production.api.responses_schema import ResponsesRequest
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


# 409: previous_response_id names a response still being generated; 410: its conversation
# was forgotten meanwhile.
@router.post(
    "/v1/responses",
    response_model=ResponseObject,
    responses=_STREAMED | sends(400, 404, 409, 410, 503),
)
async def create_response(req: ResponsesRequest, request: Request, service: ServiceDep) -> Response:
    return await responses.create(service, req, request)


@router.get("/v1/responses/{response_id}", responses=sends(404, 503))
async def get_response(response_id: str, service: ServiceDep) -> ResponseObject:
    return ResponseObject.model_validate(await responses.retrieve(service, response_id))
