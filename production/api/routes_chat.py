"""The OpenAI endpoints that generate: chat completions and (raw-text) completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from production.api import generation
from production.api.openai_schema import ChatRequest, CompletionRequest
from production.api.service import ServiceDep

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request, service: ServiceDep) -> Any:
    return await generation.chat(service, req, request)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    return await generation.complete(service, req, request)
