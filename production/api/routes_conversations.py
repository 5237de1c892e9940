"""Feedback on answers, the stored conversations (list, read, rename, forget, import) and
the feedback trend."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from data.errors import InvalidInput
from data.models import IMPORT_SOURCES
from data.views import conversation_summary, feedback_view, message_view, search_hit_view
from production.api.errors import ApiError, sends
from production.api.protocol import (
    Conversation,
    ConversationList,
    ConversationPatch,
    ConversationSummary,
    Feedback,
    FeedbackRequest,
    Forgotten,
    Imported,
    SearchResults,
    Trend,
)
from production.api.responses import message_id_of
from production.api.service import ServiceDep

router = APIRouter()


@router.post("/v1/feedback", responses=sends(400, 404, 410, 503))
async def feedback(body: FeedbackRequest, service: ServiceDep) -> Feedback:
    # A Responses API response id names its answer too (resp_<hex> is msg_<hex>).
    message_id = message_id_of(body.message_id) or body.message_id
    fb = await asyncio.to_thread(
        service.store.add_feedback,
        message_id,
        rating=body.rating,
        correction=body.correction,
        comment=body.comment,
    )
    return Feedback(**feedback_view(fb))


@router.get("/v1/trend", responses=sends(400, 503))
async def trend(service: ServiceDep, weeks: int = 4) -> Trend:
    """`whetstone trend --json`, plus its text table (the TUI's status screen shows it)."""
    from data import trend as trends

    if not 1 <= weeks <= 520:
        raise ApiError(400, f"weeks must be 1..520; got {weeks}", param="weeks")
    found = await asyncio.to_thread(trends.trend, service.store, weeks)
    return Trend(**found.as_dict(), weeks=weeks, text=trends.text(found))


@router.get("/v1/conversations", responses=sends(400, 503))
async def conversations(
    service: ServiceDep, limit: int = 50, offset: int = 0, q: str | None = None
) -> ConversationList | SearchResults:
    """Newest first; with `q`, only those whose messages or title hold its words, each with
    the snippet that matched."""
    if not 1 <= limit <= 500:
        raise ApiError(400, f"limit must be 1..500; got {limit}", param="limit")
    if not 0 <= offset < 2**63:  # SQLite's integers are 64-bit
        raise ApiError(400, f"offset must be 0..2^63-1; got {offset}", param="offset")
    if q is None:
        rows = await asyncio.to_thread(service.store.list_conversations, limit, offset)
        return ConversationList(data=[conversation_summary(c) for c in rows])
    try:
        hits = await asyncio.to_thread(service.store.search_conversations, q, limit, offset)
    except InvalidInput as exc:  # the store checks q: blank, too long, not text
        raise ApiError(400, str(exc), param="q") from None
    return SearchResults(data=[search_hit_view(hit) for hit in hits])


@router.get("/v1/conversations/{conversation_id}", responses=sends(404, 410, 503))
async def conversation(conversation_id: str, service: ServiceDep) -> Conversation:
    conv = await asyncio.to_thread(service.store.get_conversation, conversation_id)
    return Conversation(
        **conversation_summary(conv), messages=[message_view(m) for m in conv.messages]
    )


@router.patch("/v1/conversations/{conversation_id}", responses=sends(400, 404, 410, 503))
async def patch_conversation(
    conversation_id: str, body: ConversationPatch, service: ServiceDep
) -> ConversationSummary:
    fields = body.model_dump(exclude_unset=True)

    def patch() -> Any:
        if "title" in fields:
            service.store.rename_conversation(conversation_id, fields.pop("title"))
        if fields:
            service.store.update_conversation(conversation_id, **fields)
        return service.store.get_conversation(conversation_id)

    return ConversationSummary(**conversation_summary(await asyncio.to_thread(patch)))


# Forgetting is idempotent: a forgotten conversation is forgotten again, not a 410.
@router.delete("/v1/conversations/{conversation_id}", responses=sends(404, 503))
async def forget(conversation_id: str, service: ServiceDep) -> Forgotten:
    await asyncio.to_thread(service.store.forget_conversation, conversation_id)
    return Forgotten(id=conversation_id, forgotten=True)


# The body is the export file itself, as `whetstone import FILE` reads it.
_EXPORT_FILE = {
    "requestBody": {
        "required": True,
        "description": "ChatGPT's conversations.json (or the export's zip), Open WebUI's chat "
        "export, or OpenAI-format JSONL (one conversation a line)",
        "content": {
            "application/json": {"schema": {}},
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/v1/import", responses=sends(400, 503), openapi_extra=_EXPORT_FILE, response_model=Imported
)
async def import_history(
    request: Request,
    service: ServiceDep,
    source: Annotated[str | None, Query(alias="format")] = None,
) -> Imported:
    """`whetstone import`: the body is the file; `format` (chatgpt, openwebui, jsonl) is
    recognised from it when not given. Nothing is stored from a file that is refused (400
    naming the entry); importing a file again adds nothing. A file larger than
    server.max_request_bytes: `whetstone import FILE` reads any size."""
    from data.imports import ImportRefused, import_conversations, parse

    if source is not None and source not in IMPORT_SOURCES:
        choices = ", ".join(IMPORT_SOURCES)
        raise ApiError(400, f"format must be one of {choices}; got {source!r}", param="format")
    data = await request.body()
    try:
        conversations = await asyncio.to_thread(parse, data, source)
    except ImportRefused as exc:
        raise ApiError(400, f"{exc}; nothing was imported", param="body") from None
    result = await asyncio.to_thread(import_conversations, service.store, conversations)
    return Imported(**result.as_dict())
