"""The worker's own state: /health, the model list, /v1/status, and /admin/reload (serve
what `current` points to now)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from common.run_state import read_state
from data.store import Store
from data.views import promotion_view, run_outcome, run_view
from orchestrator import experiments, schedule
from orchestrator.schedule import EXPERIMENT_TRIGGER
from production.api.errors import ApiError
from production.api.model_ids import check_model, model_cards
from production.api.service import ServiceDep

router = APIRouter()


def _running_run(store: Store) -> dict[str, Any] | None:
    run = store.latest_run(status="running")
    if run is None:
        return None
    # /v1/status names only what runs and how far (`whetstone status` shows the whole run).
    view = run_view(run)
    return {k: view[k] for k in ("id", "profile", "trigger", "progress")}


def _last_run(store: Store) -> dict[str, Any] | None:
    """The newest run that ended, with how its candidate was judged and what to do next."""
    # Recipe trials are the daemon's own experiments, not the runs the person waits on.
    runs = store.list_runs(limit=10, except_trigger=EXPERIMENT_TRIGGER)
    ended = [r for r in runs if r.status not in ("queued", "running")]
    if not ended:
        return None
    return run_outcome(store, ended[0])


def _last_promotion(store: Store) -> dict[str, Any] | None:
    found = store.list_promotions(limit=1)
    if not found:
        return None
    # Without `forced`, as /v1/status has always shown it.
    return {k: v for k, v in promotion_view(found[0]).items() if k != "forced"}


@router.get("/health")
async def health(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "adapter_id": service.engine.adapter_id}


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict[str, Any]:
    return {"object": "list", "data": model_cards(service)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, service: ServiceDep) -> dict[str, Any]:
    for card in model_cards(service):
        if card["id"] == model_id:
            return card
    check_model(service, model_id)  # says why (404)
    raise ApiError(404, f"model {model_id!r} does not exist here", param="model")


@router.get("/v1/status")
async def status(service: ServiceDep) -> dict[str, Any]:
    from production.model import gpu_memory

    engine = service.engine
    return {
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
        "gpu_memory": gpu_memory.snapshot(engine.device, service.settings.devices.memory_limit_gb),
        # The supervising daemon's run/daemon.json (schedule, device plan, running job,
        # recent errors); null when this worker runs alone (`whetstone serve`).
        "daemon": read_state(service.settings),
        "running_run": await asyncio.to_thread(_running_run, service.store),
        # How the newest finished run ended: skipped (why, and what to do), or the gate's
        # decision and its next step.
        "last_run": await asyncio.to_thread(_last_run, service.store),
        "last_promotion": await asyncio.to_thread(_last_promotion, service.store),
        # Ratings or corrections still to come before one queues a run (null: off).
        "feedback_until_run": await asyncio.to_thread(
            schedule.feedback_until_run, service.settings, service.store
        ),
        # The training recipe the nightly run uses and the search's progress.
        "recipe": await asyncio.to_thread(experiments.summary, service.settings),
    }


@router.post("/admin/reload")
async def reload(service: ServiceDep) -> dict[str, Any]:
    return await service.sync_adapter()
