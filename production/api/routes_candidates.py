"""The trained adapters: list them, read a candidate's evaluation report, promote one, roll
back, and start a training run."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from candidates import Candidate, CandidateNotFound, Registry, RegistryError
from common.config import ConfigError
from orchestrator import jobs, promotion
from production.api.errors import ApiError, sends
from production.api.protocol import (
    CandidateDetail,
    CandidateList,
    PromoteRequest,
    Swap,
    TrainRequest,
    TrainStarted,
)
from production.api.service import Service, ServiceDep

router = APIRouter()

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _report_file(path: Path) -> bool:
    """Whether a candidate's report is a file whetstone wrote there: the evaluation writes
    regular files, so a symlink (to /etc/passwd, say) is never served."""
    return path.is_file() and not path.is_symlink()


def _find_candidate(registry: Registry, candidate_id: str) -> Candidate:
    """The candidate folder `candidate_id`: 400 for a malformed id, 404 for an unknown one."""
    try:
        registry.validate_id(candidate_id)
        candidate = registry.get(candidate_id)
    except CandidateNotFound:
        raise ApiError(404, f"unknown candidate {candidate_id!r}: no such folder") from None
    except (RegistryError, ValueError) as exc:
        raise ApiError(400, str(exc), param="id") from None
    if not candidate.path.is_dir() or candidate.path.is_symlink():
        # What `candidates` lists: plain folders only.
        raise ApiError(404, f"unknown candidate {candidate_id!r}: not a candidate folder")
    return candidate


def _reap(process: Any) -> None:
    """Wait for a child in the background so its exit leaves no zombie."""
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


async def _serve_new_current(service: Service, result: Any) -> Swap:
    """After a registry swap: serve it (an adapter the engine refuses: 409, said by it)."""
    await service.sync_adapter()
    return Swap(
        current=result.new_current,
        previous=result.previous,
        serving=service.engine.adapter_id,
    )


@router.get("/v1/candidates", responses=sends(503))
async def candidates(service: ServiceDep) -> CandidateList:
    rows = promotion.candidate_rows(service.store, service.registry)
    return CandidateList(data=rows[::-1])  # newest first


@router.get("/v1/candidates/{candidate_id}", responses=sends(400, 404, 503))
async def candidate(candidate_id: str, service: ServiceDep) -> CandidateDetail:
    found = _find_candidate(service.registry, candidate_id)
    md, page = found.path / REPORT_MD, found.path / REPORT_HTML
    try:
        markdown = md.read_text(encoding="utf-8") if _report_file(md) else None
    except (OSError, UnicodeDecodeError):
        markdown = None
    has_page = _report_file(page)
    return CandidateDetail(
        **promotion.candidate_row(service.store, found),
        report_markdown=markdown,
        report_html_path=str(page.absolute()) if has_page else None,
        report_html_url=f"/v1/candidates/{candidate_id}/{REPORT_HTML}" if has_page else None,
    )


@router.get(
    "/v1/candidates/{candidate_id}/report.html",
    # The page itself, not JSON: documented as HTML (FileResponse gives it no JSON schema).
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}} | sends(400, 404),
)
async def candidate_report(candidate_id: str, service: ServiceDep) -> FileResponse:
    page = _find_candidate(service.registry, candidate_id).path / REPORT_HTML
    if not _report_file(page):
        raise ApiError(
            404,
            f"candidate {candidate_id} has no report yet: run `whetstone eval {candidate_id}`",
        )
    return FileResponse(page, media_type="text/html")


@router.post("/v1/candidates/{candidate_id}/promote", responses=sends(400, 404, 409, 503))
async def promote(
    candidate_id: str, service: ServiceDep, body: PromoteRequest | None = None
) -> Swap:
    force = body.force if body is not None else False
    from production.engine import AdapterLoadError

    found = _find_candidate(service.registry, candidate_id)
    serving = service.engine.adapter_id
    preloaded = False

    def load_first() -> None:
        # The worker loads the adapter before `current` moves: one it cannot load is
        # refused while nothing has changed (no swap, no audit row).
        service.registry.validate(candidate_id, base_model=service.settings.model.base_model)
        nonlocal preloaded
        if candidate_id not in service.engine.loaded:
            service.worker.call(lambda e: e.load_adapter(candidate_id, found.path)).result()
            preloaded = True

    def drop_preloaded() -> None:
        if preloaded and service.engine.adapter_id != candidate_id:
            service.worker.call(lambda e: e.unload_adapter(candidate_id))

    try:
        # In a thread: the registry takes its file lock and checks the weights.
        result = await asyncio.to_thread(
            promotion.promote,
            service.settings,
            service.store,
            service.registry,
            candidate_id,
            force=force,
            actor="api",
            before_swap=load_first,
        )
    except AdapterLoadError as exc:
        raise ApiError(
            409, f"{exc}; nothing changed, still serving {serving or 'the base model'}"
        ) from None
    except promotion.PromotionRefused as exc:
        raise ApiError(409, str(exc)) from None
    except CandidateNotFound as exc:
        drop_preloaded()
        raise ApiError(404, str(exc)) from None
    except (RegistryError, ValueError) as exc:
        drop_preloaded()
        raise ApiError(400, str(exc)) from None
    return await _serve_new_current(service, result)


@router.post("/v1/rollback", responses=sends(409, 503))
async def rollback(service: ServiceDep) -> Swap:
    try:
        result = await asyncio.to_thread(
            promotion.rollback, service.settings, service.store, service.registry, actor="api"
        )
    except RegistryError as exc:
        raise ApiError(409, str(exc)) from None
    return await _serve_new_current(service, result)


@router.post("/v1/train", status_code=202, responses=sends(400, 409, 503))
async def train(service: ServiceDep, body: TrainRequest | None = None) -> TrainStarted:
    body = body or TrainRequest()
    try:
        # In a thread: starting the job asks nvidia-smi for the device plan.
        request = await asyncio.to_thread(
            jobs.request_training,
            service.settings,
            service.store,
            body.profile,
            force=body.force,
            promote=body.promote,
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="profile") from None
    except jobs.JobBusy as exc:
        raise ApiError(409, str(exc)) from None
    if request.process is not None:
        _reap(request.process)
    return TrainStarted(
        run_id=request.run_id,
        profile=request.profile,
        queued_with_daemon=request.queued_with_daemon,
        log=str(request.log),
    )
