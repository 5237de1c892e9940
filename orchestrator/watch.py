"""After a promotion, the person's ratings have the last word.

The gate judged the new adapter on held-out data; the person then uses it. Once they have
rated `watch.ratings` of its answers, their mean is compared with the mean of the same number
of their last ratings of the adapter it replaced (the base model after a first promotion).
Ratings that come with a correction do not count: that is the person teaching something new.
Clearly worse (by more than `watch.margin`): roll back and say why in the candidate's report
(recorded in its meta.json, from which candidates.reports renders the report again).

Stateless: everything is read from the store each time, so a daemon restart loses nothing, and
the decision is taken on the first N ratings only, so checking again never flips it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from candidates import Registry, reports
from common.config import Settings
from data.store import Store
from orchestrator import promotion

log = logging.getLogger(__name__)


def check(settings: Settings, store: Store, registry: Registry) -> str | None:
    """Roll back the newest promotion if the person rates it clearly worse than what it
    replaced. Returns the reason when it rolled back, else None."""
    wanted = settings.watch.ratings
    if wanted == 0:
        return None
    promotions = store.list_promotions(limit=1)
    if not promotions or promotions[0].action != "promote":
        return None  # nothing promoted, or the newest change was already a rollback
    promo = promotions[0]
    if registry.current_id() != promo.candidate_id:
        return None
    new = store.adapter_ratings(promo.candidate_id, since=promo.created_at, limit=wanted)
    if len(new) < wanted:
        return None
    old = store.adapter_ratings(
        promo.previous_id, until=promo.created_at, limit=wanted, newest_first=True
    )
    if len(old) < max(1, wanted // 2):
        return None  # too little to compare with: the gate's verdict stands
    mean_new, mean_old = sum(new) / len(new), sum(old) / len(old)
    if mean_new >= mean_old - settings.watch.margin:
        return None
    before = promo.previous_id or "the base model"
    reason = (
        f"rated {mean_new:.2f} on average over its first {len(new)} rated answers, against "
        f"{mean_old:.2f} for {before} over its last {len(old)} before the promotion "
        f"(allowed drop: {settings.watch.margin})"
    )
    result = promotion.rollback(settings, store, registry, actor="watch", reason=reason)
    log.warning("rolled back %s: %s", promo.candidate_id, reason)
    _note_in_report(registry.path(promo.candidate_id), reason, result.new_current)
    promotion.notify_worker(settings)
    return reason


def _note_in_report(folder: Path, reason: str, now_serving: str | None) -> None:
    """Record the rollback in the candidate's meta.json and render its report again."""
    try:
        reports.record_rollback(folder, reason=reason, now_serving=now_serving)
    except Exception:
        # The rollback itself is done and audited; a report that cannot be written must not
        # keep the API worker from being told to stop serving the adapter.
        log.exception("could not note the rollback in the report in %s", folder)
