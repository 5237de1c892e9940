"""Promotion and rollback: the registry swap, the audit row, and telling the API worker.

Shared by the CLI (`whetstone promote/rollback`), the training job (a gate-passed candidate
promotes itself) and the daemon. No torch here: the orchestrator never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from candidates.errors import CandidateNotFound
from candidates.registry import Candidate, PromotionResult, Registry, RegistryError
from common.config import Settings
from data.errors import NotFound
from data.store import Store

log = logging.getLogger(__name__)


class PromotionRefused(Exception):
    """The candidate has not passed the gate, and promotion was not forced."""


def running_server(settings: Settings) -> dict[str, Any] | None:
    """The API worker recorded in the home (run/server.json), if it answers /health."""
    info = settings.paths.server_record()
    if info is None:
        return None
    import httpx

    try:
        httpx.get(f"{info['url']}/health", timeout=2).raise_for_status()
    except (httpx.HTTPError, KeyError, TypeError):
        return None
    return info


def candidate_row(store: Store, candidate: Candidate) -> dict[str, Any]:
    """What `whetstone candidates` and GET /v1/candidates show of one candidate folder."""
    try:
        record = store.get_candidate_record(candidate.id)
    except NotFound:  # on disk only (copied in by hand): meta.json still describes it
        record = None
    evaluations = store.list_evaluations(candidate.id, limit=1)  # newest first
    last_eval = evaluations[0] if evaluations else None
    meta = candidate.meta
    evaluated = (last_eval.metrics or {}) if last_eval else {}
    return {
        "id": candidate.id,
        "current": candidate.is_current,
        "previous": candidate.is_previous,
        "valid": candidate.error is None,
        "error": candidate.error,
        "created_at": meta.created_at.isoformat() if meta else None,
        "base_model": meta.base_model if meta else None,
        "status": meta.status if meta else None,
        "decision": last_eval.decision if last_eval else None,
        "rule": last_eval.rule if last_eval else None,
        "reason": evaluated.get("reason"),
        # The candidate's own numbers from that evaluation (correction_accuracy, ...).
        "scores": evaluated.get("candidate") or {},
        "metrics": (meta.metrics if meta else None) or (record.metrics if record else {}),
    }


def candidate_rows(store: Store, registry: Registry) -> list[dict[str, Any]]:
    """One row per candidate folder, in Registry.list() order: oldest first (by created_at).
    The caller opens and closes the store and the registry."""
    return [candidate_row(store, candidate) for candidate in registry.list()]


def worker_headers(settings: Settings) -> dict[str, str]:
    """The headers a CLI request to this home's API worker carries (its bearer token)."""
    token = settings.bearer_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def notify_worker(settings: Settings) -> str:
    """Ask a running API worker to load the new `current`; say what happened."""
    server = running_server(settings)
    if server is None:
        return "no API worker is running; it will load the new adapter when it starts"
    import httpx

    try:
        resp = httpx.post(
            f"{server['url']}/admin/reload", headers=worker_headers(settings), timeout=120
        )
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        return f"the API worker at {server['url']} did not reload: {exc}"
    return f"the API worker at {server['url']} now serves it"


def promote(
    settings: Settings,
    store: Store,
    registry: Registry,
    candidate_id: str,
    *,
    force: bool = False,
    actor: str = "cli",
    before_swap: Callable[[], None] | None = None,
) -> PromotionResult:
    """Make `candidate_id` current if its latest evaluation decided "promote" (or `force`).
    Integrity is always checked by the registry; force only skips the gate. `before_swap`
    runs after the gate and before `current` moves (the API worker loads the adapter there):
    if it raises, nothing has changed."""
    registry.validate_id(candidate_id)
    try:
        meta = registry.get(candidate_id).meta
    except CandidateNotFound:
        raise PromotionRefused(
            f"there is no candidate {candidate_id}: `whetstone candidates` lists them"
        ) from None
    except RegistryError:
        meta = None  # registry.promote below says what is wrong with it
    if meta is not None and meta.status == "trial":
        # Even forced: a trial was tuned on the validation split and never judged on the
        # holdout; what it found reaches the person through the next nightly run.
        raise PromotionRefused(
            f"candidate {candidate_id} is a recipe trial; trials are never served. Its recipe "
            "is used by the next nightly run when it was adopted (`whetstone recipe`)."
        )
    audit_unrecorded_swap(store, registry)
    evaluations = store.list_evaluations(candidate_id, limit=1)  # newest first
    passed = bool(evaluations) and evaluations[0].decision == "promote"
    if not passed and not force:
        why = (
            f"its last evaluation decided {evaluations[0].decision!r} ({evaluations[0].rule})"
            if evaluations
            else "it has no evaluation yet"
        )
        raise PromotionRefused(
            f"candidate {candidate_id} has not passed the gate: {why}. "
            f"Run `whetstone eval {candidate_id}`, or use --force to promote it anyway."
        )
    if before_swap is not None:
        before_swap()
    result = registry.promote(candidate_id, base_model=settings.model.base_model, force=force)
    store.record_promotion(
        action="promote",
        candidate_id=result.new_current,
        previous_id=result.previous,
        forced=force and not passed,
        reason="passed the gate" if passed else f"forced by {actor}",
        actor=actor,
    )
    log.info("promoted %s (previous: %s) by %s", result.new_current, result.previous, actor)
    return result


def audit_unrecorded_swap(store: Store, registry: Registry) -> bool:
    """Write the audit row of a swap whose process died between moving `current` and writing
    the row (a kill -9 there left `current` changed and the log silent). Returns whether it
    wrote one. Run where the log is read or extended: daemon start, status, promote, rollback."""
    current = registry.current_id()
    last = store.list_promotions(limit=1)
    audited = last[0].candidate_id if last else None
    if current == audited:
        return False
    # Back to what the last audited swap replaced is a rollback; anything else a promotion.
    back = bool(last) and current == last[0].previous_id
    store.record_promotion(
        action="rollback" if back else "promote",
        candidate_id=current,
        previous_id=audited,
        forced=False,
        reason=(
            f"recovered: `current` is {current or 'the base model'} but the audit log ended at "
            f"{audited or 'the base model'} (the process that swapped it was stopped first)"
        ),
        actor="recovery",
    )
    log.warning("recorded an unaudited swap to %s", current or "the base model")
    return True


def rollback(
    settings: Settings,
    store: Store,
    registry: Registry,
    *,
    actor: str = "cli",
    reason: str | None = None,
) -> PromotionResult:
    """Swap `current` back to `previous` (or to the base model after the first promotion),
    audited. The watch after a promotion rolls back with action auto_rollback and its reason."""
    audit_unrecorded_swap(store, registry)
    result = registry.rollback(base_model=settings.model.base_model)
    store.record_promotion(
        action="auto_rollback" if actor == "watch" else "rollback",
        candidate_id=result.new_current,
        previous_id=result.previous,
        forced=False,
        reason=reason or f"rollback by {actor}",
        actor=actor,
    )
    log.info("rolled back to %s by %s", result.new_current or "the base model", actor)
    return result
