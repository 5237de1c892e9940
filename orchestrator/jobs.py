"""Training jobs as subprocesses: start one on the development device, and notice the ones
that died without reporting (kill -9, OOM killer, power loss).

The job itself (`python -m development.train`) records its own progress and outcome in the
store; the orchestrator only starts it, watches its pid, and reaps it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import devices, gpus
from common.config import Settings, device_plan
from common.fs import pid_alive
from common.run_state import daemon_pid
from data.store import Store
from orchestrator.schedule import EXPERIMENT_TRIGGER

log = logging.getLogger(__name__)

TRAIN_MODULE = "development.train"


def reap_dead_runs(store: Store) -> list[str]:
    """Mark runs whose process is gone as failed; returns their ids. A queued run without a
    process waits for a daemon's dispatcher, however old it is and whether or not a daemon
    runs now: a run queued before the machine went off runs when the daemon next starts."""
    reaped = []
    for status in ("running", "queued"):
        for run in store.list_runs(limit=50, status=status):
            if run.pid is None or pid_alive(run.pid, TRAIN_MODULE):
                continue
            error = (
                f"the training process (pid {run.pid}) ended without reporting: "
                f"killed or crashed (see logs/{run.id}.log)"
            )
            store.update_run(run.id, status="failed", error=error)
            log.warning("run %s: %s", run.id, error)
            reaped.append(run.id)
    return reaped


class JobBusy(RuntimeError):
    """A training run is still alive: never two at once."""


def log_file(settings: Settings, run_id: str) -> Path:
    return settings.paths.logs_dir / f"{run_id}.log"


def start_training(
    settings: Settings,
    store: Store,
    profile: str,
    *,
    trigger: str = "manual",
    extra_args: list[str] | None = None,
    run_id: str | None = None,
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a run's process on the development device, in its own session (so a Ctrl-C in
    the terminal that started it does not kill it): the queued run `run_id`, or a new one.
    Returns (run id, process). Raises JobBusy while another run's process is alive (dead ones
    are reaped first)."""
    settings.profile(profile)  # unknown profile: ConfigError now, not in the child
    reap_dead_runs(store)
    alive = [run for run in store.list_runs(limit=5, status="running") if run.pid]
    if alive:
        raise JobBusy(f"run {alive[0].id} is still training (pid {alive[0].pid}); one at a time")
    run = store.get_run(run_id) if run_id else store.create_run(profile, trigger)
    device = device_plan(settings, gpus.count()).development
    argv = [
        sys.executable,
        "-m",
        TRAIN_MODULE,
        "--home",
        str(settings.paths.root),
        "--profile",
        profile,
        "--run-id",
        run.id,
        "--trigger",
        trigger,
    ]
    argv += extra_args or []
    settings.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_file(settings, run.id), "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=devices.child_env(settings, "development"),
                start_new_session=True,
            )
    except OSError as exc:  # a run that never got a process is failed now, not left queued
        store.update_run(run.id, status="failed", error=f"could not start training: {exc}")
        raise
    store.update_run(run.id, pid=process.pid)
    log.info("started run %s (pid %d, %s on %s)", run.id, process.pid, profile, device)
    return run.id, process


@dataclass(frozen=True)
class TrainingRequest:
    """What request_training() did: started the run's process here, or queued it with the
    daemon that holds the home."""

    run_id: str
    profile: str
    process: subprocess.Popen[bytes] | None  # None: the daemon's dispatcher starts it
    daemon_pid: int | None  # the daemon the run was queued with; None: started here
    log: Path

    @property
    def queued_with_daemon(self) -> bool:
        return self.daemon_pid is not None


def request_training(
    settings: Settings,
    store: Store,
    profile: str | None = None,
    *,
    force: bool = False,
    promote: bool = True,
    sets: list[str] | None = None,
) -> TrainingRequest:
    """A manual training run (`whetstone train`, POST /v1/train): queued in the store for
    the daemon's dispatcher when a daemon holds the home (one job at a time, on its
    development device), else started here. `profile` None means
    training.default_profile; `sets` are --set KEY=VALUE items passed on to the job.
    Raises ConfigError for an unknown profile, JobBusy while another run trains or one is
    already queued."""
    name = profile or settings.training.default_profile
    settings.profile(name)  # unknown profile: ConfigError naming the known ones
    extra = (["--force"] if force else []) + ([] if promote else ["--no-promote"])
    for item in sets or []:
        extra += ["--set", item]
    owner = daemon_pid(settings.paths.root)
    process = None
    if owner is not None:
        # One run waits at most: a second request (a double press of `t`, a page posting
        # in a loop) would only queue the same training again behind it.
        queued = store.list_runs(limit=20, status="queued", except_trigger=EXPERIMENT_TRIGGER)
        waiting = [run for run in queued if run.pid is None]
        if waiting:
            raise JobBusy(
                f"run {waiting[-1].id} ({waiting[-1].profile}) is already queued; it starts "
                "when the daemon is free"
            )
        run_id = store.create_run(name, "manual").id
        store.update_run(run_id, progress={"stage": "queued", "args": extra})
    else:
        run_id, process = start_training(settings, store, name, extra_args=extra)
    return TrainingRequest(run_id, name, process, owner, log_file(settings, run_id))
