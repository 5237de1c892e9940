"""What the schedule runs. Each trigger only queues a training run in the store; the
daemon's dispatcher starts queued runs one at a time (orchestrator.daemon).

The APScheduler job store keeps jobs in the home's database and refers to these functions by
import path, with the home as their only argument, so they must stay importable here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from candidates import Registry
from common.config import Settings, load_settings
from data.store import Store

log = logging.getLogger(__name__)

# The trigger of recipe-search trials (orchestrator.experiments): they train nothing served.
EXPERIMENT_TRIGGER = "experiment"
# The trigger of the run that follows a promotion, in the same process, to train on the
# corrections its gate released from the holdout (training.catch_up, development.train).
CATCH_UP_TRIGGER = "catch-up"
# The trigger of the run that follows a refusal for broken answers or lost general knowledge,
# in the same process, at a lower learning rate (training.retry_learning_rate_scale).
RETRY_TRIGGER = "retry"

# Settings of the daemons running in this process, by home: they carry the command line's
# overrides, which a fresh load_settings(home) would not.
RUNNING: dict[str, Settings] = {}


def _settings(home: str) -> Settings:
    return RUNNING.get(home) or load_settings(Path(home))


def enqueue(settings: Settings, store: Store, profile: str, trigger: str) -> str | None:
    """Queue a run unless one is already waiting (triggers coalesce). Returns its id."""
    # A queued trial does not count: a real run is queued and stops it.
    waiting = store.list_runs(limit=1, status="queued", except_trigger=EXPERIMENT_TRIGGER)
    if waiting:
        log.info("%s trigger: run %s is already queued", trigger, waiting[0].id)
        return None
    run = store.create_run(profile, trigger)
    log.info("%s trigger: queued run %s (%s)", trigger, run.id, profile)
    return run.id


def enqueue_on_feedback(settings: Settings, store: Store) -> str | None:
    """Queue a quick run once `schedule.every_n_feedback` feedback items arrived since the
    last run was queued (whatever became of it; recipe trials do not count)."""
    every = settings.schedule.every_n_feedback
    if every == 0:
        return None
    last = store.latest_run(except_trigger=EXPERIMENT_TRIGGER)
    new = store.count_feedback_since(last.created_at if last else None)
    if new < every:
        return None
    return enqueue(settings, store, settings.schedule.feedback_profile, "feedback")


def feedback_until_run(settings: Settings, store: Store) -> int | None:
    """How many more ratings or corrections queue the next automatic run (None: off)."""
    every = settings.schedule.every_n_feedback
    if every == 0:
        return None
    last = store.latest_run(except_trigger=EXPERIMENT_TRIGGER)
    return max(0, every - store.count_feedback_since(last.created_at if last else None))


def nightly(home: str) -> None:
    """The nightly cycle: dataset, train, evaluate, gate, promote, report (one queued run)."""
    settings = _settings(home)
    store = Store(settings.db_url)
    try:
        enqueue(settings, store, settings.schedule.nightly_profile, "nightly")
    finally:
        store.close()


def retention(home: str) -> None:
    """Delete old candidates beyond `retention_keep_last` (never current or previous)."""
    settings = _settings(home)
    removed = Registry(settings.paths.candidates_dir).retain(
        settings.retention_keep_last, keep_trials=settings.experiments.keep_trials
    )
    if removed:
        log.info("retention: removed %s", ", ".join(removed))


def weekly_report(home: str) -> None:
    """The trend page of the last weeks into <home>/reports/ (in a child process: the daemon
    imports no plotting or training code)."""
    import subprocess
    import sys

    settings = _settings(home)
    done = subprocess.run(
        [sys.executable, "-m", "development.trend_report", "--home", home],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        log.error("weekly report failed: %s", done.stderr.strip()[-500:])
    else:
        log.info("weekly report: %s (%s)", done.stdout.strip(), settings.paths.root)
