"""What the home is doing, read once for both places that show it: `whetstone status` (the
CLI prints a HomeStatus) and the API worker's /v1/status (the route returns a
TrainingStatus's fields beside the worker's own).

Both show the daemon's state, the run training now, how the last run went, the last
promotion, the feedback still to come before a run and the training recipe. Where the two
have always shown a field differently, each keeps its own shape (`as_dict` and `api_fields`
say which): the CLI's `last_run` is the newest run of any kind, /v1/status's the newest one
that ended, with how its gate judged it (what the TUI's status screen shows when nothing runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candidates import Registry
from common.config import Settings
from common.run_state import read_state
from data.models import Promotion, TrainingRun
from data.store import Store
from data.views import promotion_view, run_outcome, run_view
from orchestrator import experiments, schedule
from orchestrator.jobs import reap_dead_runs
from orchestrator.promotion import audit_unrecorded_swap, running_server
from orchestrator.schedule import EXPERIMENT_TRIGGER


@dataclass(frozen=True)
class TrainingStatus:
    """The daemon and training, as one read of the store and the home's run files."""

    daemon: dict[str, Any] | None  # run/daemon.json; None when no daemon holds the home
    running_run: TrainingRun | None  # the run training now
    latest_run: TrainingRun | None  # the newest run, queued, running or ended
    last_outcome: dict[str, Any] | None  # the newest ended run but a recipe trial, judged
    last_promotion: Promotion | None
    feedback_until_run: int | None  # ratings or corrections still to come (None: off)
    recipe: dict[str, Any]  # the recipe the nightly run uses, and the search's progress

    def api_fields(self) -> dict[str, Any]:
        """The fields /v1/status shows beside the worker's own."""
        running = None
        if self.running_run is not None:
            # /v1/status names only what runs and how far (`whetstone status` shows the run).
            view = run_view(self.running_run)
            running = {k: view[k] for k in ("id", "profile", "trigger", "progress")}
        promotion = None
        if self.last_promotion is not None:
            # Without `forced`, as /v1/status has always shown it.
            promotion = {
                k: v for k, v in promotion_view(self.last_promotion).items() if k != "forced"
            }
        return {
            # The supervising daemon's run/daemon.json (schedule, device plan, running job,
            # recent errors); null when this worker runs alone (`whetstone serve`).
            "daemon": self.daemon,
            "running_run": running,
            # How the newest finished run ended: skipped (why, and what to do), or the gate's
            # decision and its next step.
            "last_run": self.last_outcome,
            "last_promotion": promotion,
            # Ratings or corrections still to come before one queues a run (null: off).
            "feedback_until_run": self.feedback_until_run,
            # The training recipe the nightly run uses and the search's progress.
            "recipe": self.recipe,
        }


@dataclass(frozen=True)
class HomeStatus:
    """What `whetstone status` shows: the home, its worker, adapters and data, and training."""

    home: Path
    server: dict[str, Any] | None  # run/server.json, when the worker there answers /health
    base_model: str
    current_adapter: str | None
    previous_adapter: str | None
    counts: dict[str, Any]  # Store.counts()
    training: TrainingStatus

    @property
    def run_state(self) -> str:
        """The daemon's own state; without one, "serving" means a lone `whetstone serve`."""
        daemon = self.training.daemon
        if daemon:
            return daemon["state"]
        return "serving" if self.server else "stopped"

    def as_dict(self) -> dict[str, Any]:
        """The fields `whetstone status --json` shows."""
        training = self.training
        running, latest = training.running_run, training.latest_run
        promotion = training.last_promotion
        return {
            "home": str(self.home),
            "run_state": self.run_state,
            "daemon": training.daemon,
            "server": self.server,
            "running_run": run_view(running) if running else None,
            "base_model": self.base_model,
            "current_adapter": self.current_adapter,
            "previous_adapter": self.previous_adapter,
            "counts": self.counts,
            "last_run": run_view(latest) if latest else None,
            "last_promotion": promotion_view(promotion) if promotion else None,
            "recipe": training.recipe,
            "feedback_until_run": training.feedback_until_run,
        }


def read_training_status(settings: Settings, store: Store) -> TrainingStatus:
    """The daemon's state and training's, from run/daemon.json, the store and the recipe."""
    promotions = store.list_promotions(limit=1)
    return TrainingStatus(
        daemon=read_state(settings),
        running_run=store.latest_run(status="running"),
        latest_run=store.latest_run(),
        last_outcome=last_outcome(store),
        last_promotion=promotions[0] if promotions else None,
        feedback_until_run=schedule.feedback_until_run(settings, store),
        recipe=experiments.summary(settings),
    )


def read_home_status(settings: Settings, store: Store, registry: Registry) -> HomeStatus:
    """The whole home's status. It first settles what a killed process left behind (runs
    whose process died are marked failed, a swap with no audit row gets one), as every
    reader of the run list and the audit log does."""
    server = running_server(settings)
    reap_dead_runs(store)
    audit_unrecorded_swap(store, registry)
    training = read_training_status(settings, store)
    return HomeStatus(
        home=settings.paths.root,
        server=server,
        base_model=settings.model.base_model,
        current_adapter=registry.current_id(),
        previous_adapter=registry.previous_id(),
        counts=store.counts(),
        training=training,
    )


def last_outcome(store: Store) -> dict[str, Any] | None:
    """The newest run that ended, with how its candidate was judged and what to do next."""
    # Recipe trials are the daemon's own experiments, not the runs the person waits on.
    runs = store.list_runs(limit=10, except_trigger=EXPERIMENT_TRIGGER)
    ended = [r for r in runs if r.status not in ("queued", "running")]
    if not ended:
        return None
    return run_outcome(store, ended[0])
