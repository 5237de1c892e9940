"""The daemon's supervision with a fake API worker (tests/fake_api_worker.py), in seconds:
restart backoff, the crash-loop give-up with the worker's last words, a live worker that
stops answering /health killed and replaced, the crash count cleared by a stable worker, and
the schedule reconciled across restarts. The real-model daemon tests (test_daemon.py) cover
the same paths end to end."""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from common.config import Settings, load_settings
from common.fs import pid_alive
from common.run_state import read_state
from data.store import Store
from orchestrator.daemon import Daemon
from tests.test_daemon import free_port

FAKE_WORKER = Path(__file__).with_name("fake_api_worker.py")


def settings_for(home: Path, script: str, **daemon: Any) -> Settings:
    """Fast supervision knobs; the fake worker's behaviour per start in <home>/fake-worker."""
    (home / "fake-worker").write_text(script)
    knobs = {
        "poll_s": 0.2,
        "restart_backoff_s": 0.2,
        "restart_backoff_max_s": 0.8,
        "worker_start_timeout_s": 10,
        "health_failures": 2,
        **daemon,
    }
    overrides = {"daemon": knobs, "server": {"port": free_port()}}
    return load_settings(home, overrides | {"schedule": {"every_n_feedback": 0}})


def fake_command(settings: Settings) -> list[str]:
    script = settings.paths.root / "fake-worker"
    return [
        sys.executable,
        str(FAKE_WORKER),
        "--port",
        str(settings.server.port),
        "--script",
        str(script),
    ]


def starts(settings: Settings) -> list[tuple[float, int, str]]:
    """(time, pid, behaviour) of every start of the fake worker so far."""
    path = settings.paths.root / "fake-worker.starts"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(float(t), int(pid), what) for t, pid, what in (line.split() for line in lines)]


def worker_state(settings: Settings) -> dict[str, Any]:
    """The worker as `whetstone status` and /v1/status read it (run/daemon.json)."""
    return (read_state(settings) or {}).get("worker") or {}


def run_daemon_until(
    settings: Settings, what: str, check: Callable[[], Any], timeout: float = 30
) -> Any:
    """Run the daemon in this process with the fake worker until `check()` is truthy."""

    async def main() -> Any:
        async with Daemon(settings, worker_command=fake_command(settings)) as daemon:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                found = check()
                if found:
                    daemon.stop()
                    return found
                await asyncio.sleep(0.05)
            raise AssertionError(f"timed out waiting for {what}: {worker_state(settings)}")

    return asyncio.run(main())


def test_a_crash_loop_backs_off_then_gives_up_with_the_workers_last_words(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(home, "crash", max_restarts=3)

    def given_up() -> Any:
        worker = worker_state(settings)
        if worker.get("state") != "failed":
            return None
        time.sleep(1.0)  # long past the next backoff: no start after giving up
        return worker

    with caplog.at_level(logging.WARNING, logger="orchestrator.daemon"):
        worker = run_daemon_until(settings, "the worker given up", given_up)

    waits = [r.args[0] for r in caplog.records if r.msg.startswith("restarting the API worker")]
    assert waits == [0.2, 0.4, 0.8], waits  # doubling from restart_backoff_s, capped at the max
    times = [t for t, _, _ in starts(settings)]
    assert len(times) == 4, starts(settings)  # the first start and max_restarts restarts
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)
    assert worker["crashes_in_row"] == 4 and worker["restarts"] == 3
    assert "crashed 4 times in a row" in worker["last_error"], worker
    assert "planted start failure" in worker["last_error"], worker  # from the worker's log
    assert worker["last_exit"] == 3


def test_a_worker_that_stops_answering_health_is_killed_and_replaced(home: Path) -> None:
    # The first worker answers twice (its readiness check and one poll), then says 503.
    settings = settings_for(home, "sicken:2,serve")

    def replaced() -> Any:
        worker = worker_state(settings)
        return worker.get("state") == "up" and worker.get("restarts") == 1 and worker

    worker = run_daemon_until(settings, "a replaced worker", replaced)

    (_, sick_pid, first), (_, well_pid, second) = starts(settings)
    assert (first, second) == ("sicken:2", "serve")
    assert worker["pid"] == well_pid and not pid_alive(sick_pid)
    assert worker["last_exit"] == -9  # killed: it was alive, only unhealthy


def test_a_worker_up_long_enough_clears_the_crash_count(home: Path) -> None:
    settings = settings_for(home, "crash,crash,serve", stable_after_s=0.5)

    def stable() -> Any:
        worker = worker_state(settings)
        return worker.get("state") == "up" and worker.get("crashes_in_row") == 0 and worker

    worker = run_daemon_until(settings, "a stable worker", stable)

    assert worker["restarts"] == 2 and [what for _, _, what in starts(settings)] == [
        "crash",
        "crash",
        "serve",
    ]


def _move_nightly_into_the_past(settings: Settings, minutes: int) -> None:
    """What a machine that was off at the nightly time looks like: the stored next run passed."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    store = SQLAlchemyJobStore(url=settings.db_url, tablename="schedule_jobs")
    store.start(None, "default")
    job = store.lookup_job("nightly")
    job.next_run_time = datetime.now(UTC) - timedelta(minutes=minutes)
    store.update_job(job)
    store.shutdown()


def _schedule(settings: Settings) -> dict[str, datetime]:
    state = read_state(settings) or {}
    return {
        job["id"]: datetime.fromisoformat(job["next_run_at"])
        for job in state.get("schedule") or []
        if job.get("next_run_at")
    }


def test_the_schedule_keeps_its_cron_across_restarts_runs_a_missed_night_once_and_follows_edits(
    home: Path,
) -> None:
    (home / "config.toml").write_text('[schedule]\nnightly_cron = "17 4 * * *"\n')
    settings = settings_for(home, "serve")
    jobs = run_daemon_until(
        settings, "the schedule", lambda: len(_schedule(settings)) == 3 and _schedule(settings)
    )
    assert (jobs["nightly"].hour, jobs["nightly"].minute) == (4, 17)
    assert {"retention", "weekly_report"} <= set(jobs)

    # Off at 04:17: the next daemon runs the missed night once (kept within the grace).
    _move_nightly_into_the_past(settings, minutes=30)
    with Store(settings.db_url) as store:

        def missed_night_ran() -> Any:
            runs = store.list_runs()
            done = runs and runs[0].status not in ("queued", "running")
            return done and (runs, _schedule(settings))

        runs, jobs = run_daemon_until(
            settings, "the missed nightly run", missed_night_ran, timeout=120
        )
    # The nightly profile `auto` is recorded as what it stands for here: quick_test, no GPU.
    assert [(r.trigger, r.profile, r.status) for r in runs] == [
        ("nightly", "quick_test", "skipped")
    ]
    after = jobs["nightly"]
    assert (after.hour, after.minute) == (4, 17) and after > datetime.now(UTC)

    # An edited cron replaces the stored job at the next start.
    (home / "config.toml").write_text('[schedule]\nnightly_cron = "5 3 * * *"\n')
    settings = settings_for(home, "serve")
    edited = run_daemon_until(settings, "the schedule", lambda: _schedule(settings).get("nightly"))
    assert (edited.hour, edited.minute) == (3, 5)


def test_the_base_answers_pause_for_a_chat_when_their_process_was_slow_to_start(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base answers' process is started from the dispatch thread while the guard that
    pauses it for the person's chat runs on the event loop. A fork that took a while on two
    busy cores let the guard see nothing due and nothing running, and it ended for good: on a
    newcomer's `make run`, answers ran beside every chat (10-110 s an answer instead of 2-8)."""
    settings = settings_for(home, "serve")
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def slow_fork(argv: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen:
        if "development.base_answers" not in argv:
            return real_popen(argv, *args, **kwargs)
        time.sleep(1.5)  # a fork behind a training run and a chat answer
        # The model's answers (a minute or more) stand-in: a process that lives until stopped.
        process = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(subprocess, "Popen", slow_fork)

    def chatted_and_paused() -> Any:
        if not started:
            return None
        state = read_state(settings) or {}
        if not state.get("preparing_paused"):
            with Store(settings.db_url) as store:
                if store.last_message_at() is None:  # the person says something
                    conversation = store.create_conversation()
                    store.add_message(conversation.id, "user", "Hello!")
            return None
        return Path(f"/proc/{started[0].pid}/status").read_text()

    status = run_daemon_until(settings, "the answers paused for a chat", chatted_and_paused, 20)
    assert "State:\tT" in status  # stopped while the person chats
    started[0].wait(timeout=30)  # and the daemon's stop ended it
