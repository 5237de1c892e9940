"""The memory (issue 37): the notes made from corrections, listed, written by hand and
forgotten. Whether they are given to the model is memory.enabled (production/api/memory.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from common.config import ConfigError, set_in_config
from data.errors import InvalidInput
from data.views import note_view
from production.api.errors import ApiError, sends
from production.api.protocol import (
    Forgotten,
    MemoryRequest,
    MemoryState,
    MemorySwitch,
    Note,
    NoteList,
)
from production.api.service import ServiceDep

router = APIRouter()


@router.get("/v1/memory", responses=sends(400, 503))
async def notes(service: ServiceDep, limit: int = 50, offset: int = 0) -> NoteList:
    """Notes not forgotten, newest first: "learned" where the serving adapter answers the
    note's question right without it (then it is no longer given to the model)."""
    if not 1 <= limit <= 500:
        raise ApiError(400, f"limit must be 1..500; got {limit}", param="limit")
    if not 0 <= offset < 2**63:  # SQLite's integers are 64-bit
        raise ApiError(400, f"offset must be 0..2^63-1; got {offset}", param="offset")

    def listed() -> list[dict]:
        learned = service.store.learned_notes(service.engine.adapter_id)
        return [note_view(n, learned) for n in service.store.list_notes(limit, offset)]

    views = await asyncio.to_thread(listed)
    return NoteList(data=[Note(**view) for view in views], enabled=service.settings.memory.enabled)


@router.post("/v1/memory", responses=sends(400, 503))
async def add_note(body: MemoryRequest, service: ServiceDep) -> Note:
    try:
        note = await asyncio.to_thread(service.store.add_note, body.text, question=body.question)
    except InvalidInput as exc:  # the store's checks name the field first
        field = str(exc).split(" ", 1)[0]
        param = field if field in ("text", "question") else None
        raise ApiError(400, str(exc), param=param) from None
    return Note(**note_view(note))


@router.patch("/v1/memory", responses=sends(400, 409, 503))
async def switch(body: MemorySwitch, service: ServiceDep) -> MemoryState:
    """The memory on or off: written to config.toml (kept across restarts) and used by this
    worker from the next message on; the nightly evaluation reads it at its next run."""
    try:
        await asyncio.to_thread(
            set_in_config, service.settings.home, "memory.enabled", body.enabled
        )
    except ConfigError as exc:
        raise ApiError(409, str(exc), param="enabled") from None
    service.settings.memory.enabled = body.enabled
    return MemoryState(enabled=body.enabled)


# Forgetting is idempotent, as for conversations: a forgotten note is forgotten again.
@router.delete("/v1/memory/{note_id}", responses=sends(404, 503))
async def forget_note(note_id: str, service: ServiceDep) -> Forgotten:
    await asyncio.to_thread(service.store.forget_note, note_id)
    return Forgotten(id=note_id, forgotten=True)
