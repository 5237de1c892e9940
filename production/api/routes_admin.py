"""The worker's own state: /health, the model list, /v1/status, and /admin/reload (serve
what `current` points to now)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

from fastapi import APIRouter

from orchestrator.status import read_training_status
from production.api.errors import ApiError, sends
from production.api.model_ids import check_model, model_cards
from production.api.protocol import Health, ModelCard, ModelList, Reload, Status
from production.api.service import ServiceDep

# /health: a supervisor probes it without the bearer token (guards.py).
unguarded = APIRouter()
router = APIRouter()


@unguarded.get("/health")
async def health(service: ServiceDep) -> Health:
    return Health(status="ok", adapter_id=service.engine.adapter_id)


@router.get("/v1/models")
async def models(service: ServiceDep) -> ModelList:
    return ModelList(object="list", data=model_cards(service))


@router.get("/v1/models/{model_id:path}", responses=sends(404))
async def model(model_id: str, service: ServiceDep) -> ModelCard:
    for card in model_cards(service):
        if card.id == model_id:
            return card
    check_model(service, model_id)  # says why (404)
    raise ApiError(404, f"model {model_id!r} does not exist here", param="model")


@router.get("/v1/status", responses=sends(503))
async def status(service: ServiceDep) -> Status:
    from production.model import gpu_memory

    engine = service.engine
    worker = {
        "run_state": "running",
        "base_model": engine.base_model_name,
        "backend": engine.backend,
        "decode": engine.decode,
        "device": engine.device,
        "chat_format": engine.format.name,
        "adapter_id": engine.adapter_id,
        "adapter_loaded_at": engine.adapter_loaded_at.isoformat(),
        "last_swap_error": service.last_swap_error,
        "queue_waiting": service.worker.waiting,
        "busy": service.worker.busy,
        "requests_served": service.served,
        "started_at": service.started_at.isoformat(),
        "uptime_s": round((datetime.now(UTC) - service.started_at).total_seconds(), 1),
        "context_window": engine.context_window,
        "prompt_cache": {
            "enabled": service.settings.server.prompt_cache,
            **dataclasses.asdict(engine.prompt_cache),
        },
        "gpu_memory": gpu_memory.snapshot(engine.device, service.settings.devices.memory_limit_gb),
    }
    # The daemon, the training run, the last run and promotion, the recipe: what `whetstone
    # status` reads too (orchestrator/status.py).
    training = await asyncio.to_thread(read_training_status, service.settings, service.store)
    return Status(**worker, **training.api_fields())


@router.post("/admin/reload", responses=sends(409))
async def reload(service: ServiceDep) -> Reload:
    return Reload(**await service.sync_adapter())
