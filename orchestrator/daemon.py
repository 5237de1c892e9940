"""The supervising daemon, `whetstone up`: one per home, for months, under systemd.

    whetstone up [--home H] [--host 127.0.0.1] [--port 8321]

It holds the home's lock (run/daemon.lock), decides the device plan, keeps the API worker
(`python -m production.server`) alive on the production device (restarting it with backoff,
giving up with the reason after too many crashes in a row), runs the schedule (APScheduler,
jobs persisted in the home's database: the nightly run and the retention sweep), starts
queued training runs one at a time on the development device, kills a hung one, after a
promotion lets the person's ratings roll a bad adapter back (orchestrator.watch), and on the
development device's idle time runs recipe-search trials (orchestrator.experiments), stopping
one as soon as a run is queued or the person chats on a device it shares.

Training triggers only *queue* a run in the store (nightly, every N new feedback items,
`whetstone train` while the daemon runs); the dispatcher here starts queued runs in order.
So two triggers never start two jobs, and a queued run survives a daemon restart.

It never imports torch: workers are subprocesses whose CUDA_VISIBLE_DEVICES is set before
they start. What it is doing is written to run/daemon.json (atomically) for `whetstone
status`, the API's /v1/status and the TUI.

    async with Daemon(settings) as daemon:   # lock, scheduler, worker started
        await daemon.serve()                 # until stop() (SIGTERM/SIGINT)
                                             # exit: training cancelled, worker stopped

One module on purpose: the API supervisor, the run dispatcher and the trial guard share the
daemon's state (one job at a time) and its lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from candidates import Registry
from common import devices, gpus
from common.config import EMBEDDED_MODEL, ConfigError, Settings, device_plan
from common.entrypoint import whetstone_command
from common.fs import atomic_write_text, pid_alive
from common.run_state import HomeLock, RunState, state_file
from data.models import RUN_FINISHED
from data.store import Store
from data.views import outcome_line, run_outcome
from orchestrator import experiments, jobs, promotion, schedule, watch

log = logging.getLogger(__name__)

# The base answers resume after this long without a chat message (see _answers_guard).
ANSWERS_IDLE_S = 15.0

WORKER_LOG = "production.log"
SERVER_MODULE = "production.server"


# --- the API worker --------------------------------------------------------------------------


def api_worker_command(settings: Settings) -> list[str]:
    """The API worker's command line: `python -m production.server` on the configured port."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--home", str(settings.paths.root)]
    return [*argv, "--host", settings.server.host, "--port", str(settings.server.port)]


def _killed_with(parent: int) -> Callable[[], None]:
    """For a child's preexec_fn: the kernel SIGKILLs the child when the daemon dies, kill -9
    included. The base answers are SIGSTOPped while the person chats, and a stopped process
    takes no signal but SIGKILL, so without this a killed daemon left one stopped for good,
    holding the model's memory (Linux's PR_SET_PDEATHSIG; it follows the thread that
    started the child, and the dispatcher's executor threads live as long as the daemon)."""

    def arm() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the daemon died before the signal was armed
            os._exit(1)

    return arm


class ApiSupervisor:
    """Keeps the API worker subprocess alive: restarts it with exponential backoff, kills it
    when it stops answering /health, and gives up (with the reason) after too many crashes
    in a row. `command` is the worker's command line (tests give a small fake)."""

    def __init__(self, settings: Settings, changed: Any, command: Sequence[str]) -> None:
        self.settings = settings
        self._changed = changed  # called when something status shows has changed
        self.command = list(command)
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = "stopped"  # starting | up | restarting | failed | stopped
        self.started_at: datetime | None = None
        self.up_since: float | None = None
        self.restarts = 0
        self.crashes_in_row = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self.next_restart_at: datetime | None = None
        self.url = settings.server.local_url
        self.log_path = settings.paths.logs_dir / WORKER_LOG

    def snapshot(self) -> dict[str, Any]:
        alive = self.proc is not None and self.proc.poll() is None
        return {
            # Between a crash and the watcher noticing it, say so rather than "up".
            "state": "exited" if self.state == "up" and not alive else self.state,
            "pid": self.proc.pid if self.proc and self.proc.poll() is None else None,
            "url": self.url,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "uptime_s": round(time.monotonic() - self.up_since, 1) if self.up_since else None,
            "restarts": self.restarts,
            "crashes_in_row": self.crashes_in_row,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "next_restart_at": self.next_restart_at.isoformat() if self.next_restart_at else None,
            "log": str(self.log_path),
        }

    def _set(self, state: str) -> None:
        self.state = state
        self._changed()

    def _start(self) -> None:
        settings = self.settings
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"--- {datetime.now(UTC).isoformat()} starting the API worker\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # The worker stops by itself if this process dies without stopping it.
                env=devices.child_env(settings, "production")
                | {"WHETSTONE_DAEMON_PID": str(os.getpid())},
            )
        self.started_at = datetime.now(UTC)
        self.up_since = None
        log.info("API worker starting (pid %d) on %s", self.proc.pid, self.url)

    async def _healthy(self) -> bool:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"{self.url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    def _log_tail(self) -> str:
        """The last meaningful lines the worker wrote (its error, usually)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line for line in lines if line.strip() and not line.startswith("---")]
        return " | ".join(lines[-3:])[-600:]

    async def _wait_ready(self, stopping: asyncio.Event) -> bool:
        deadline = time.monotonic() + self.settings.daemon.worker_start_timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline and not stopping.is_set():
            if self.proc.poll() is not None:
                return False
            if await self._healthy():
                return True
            await asyncio.sleep(0.5)
        return False

    async def run(self, stopping: asyncio.Event) -> None:
        """Start the worker and keep it up until `stopping` is set or it crashed too often."""
        cfg = self.settings.daemon
        while not stopping.is_set():
            self._start()
            self._set("starting")
            if await self._wait_ready(stopping):
                self.up_since = time.monotonic()
                self.next_restart_at = None
                self._set("up")
                log.info("API worker up at %s (pid %d)", self.url, self.proc.pid)
                await self._watch(stopping)
            if stopping.is_set():
                return
            await self._crashed()
            if self.crashes_in_row > cfg.max_restarts:
                self.last_error = (
                    f"the API worker crashed {self.crashes_in_row} times in a row; not "
                    f"restarting it (daemon.max_restarts = {cfg.max_restarts}). Last exit "
                    f"code {self.last_exit}; its log ({self.log_path}) ends: {self._log_tail()}"
                )
                log.error("%s", self.last_error)
                self._set("failed")
                return
            wait = min(
                cfg.restart_backoff_s * 2 ** (self.crashes_in_row - 1), cfg.restart_backoff_max_s
            )
            self.next_restart_at = datetime.now(UTC) + timedelta(seconds=wait)
            self._set("restarting")
            log.warning("restarting the API worker in %.1f s", wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)
            self.restarts += 1

    async def _watch(self, stopping: asyncio.Event) -> None:
        """Until the worker exits, stops answering /health, or we stop."""
        cfg = self.settings.daemon
        missed = 0
        next_check = time.monotonic() + cfg.poll_s
        assert self.proc is not None
        while not stopping.is_set():
            if self.proc.poll() is not None:
                return
            stable = self.up_since and time.monotonic() - self.up_since >= cfg.stable_after_s
            if stable and self.crashes_in_row:
                self.crashes_in_row = 0
                self._changed()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + cfg.poll_s
                missed = 0 if await self._healthy() else missed + 1
                if missed >= cfg.health_failures:
                    log.error("API worker missed %d health checks; killing it", missed)
                    self.proc.kill()
                    self.proc.wait()
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)

    async def _crashed(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:  # never became healthy in time
            self.proc.kill()
        self.last_exit = self.proc.wait()
        self.crashes_in_row += 1
        tail = self._log_tail()
        self.last_error = f"exit code {self.last_exit}: {tail}"
        log.error("API worker exited with %s; log ends: %s", self.last_exit, tail)
        self.up_since = None
        self._changed()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.up_since = None
        self._set("stopped")


def stop_leftover_worker(settings: Settings) -> None:
    """A worker left running by a daemon that was killed -9 still holds the port: stop it."""
    pid = settings.paths.server_pid()
    if pid is None or not pid_alive(pid, SERVER_MODULE):
        return
    log.warning("stopping the API worker (pid %d) left by a previous daemon", pid)
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not pid_alive(pid, SERVER_MODULE):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


# --- the daemon ------------------------------------------------------------------------------


class Daemon:
    """See the module docstring. stop() only signals; serve() returns, __aexit__ cleans up."""

    def __init__(self, settings: Settings, *, worker_command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.state = RunState.STOPPED
        self._stopping = asyncio.Event()
        self._lock = HomeLock(settings)
        self.plan = device_plan(settings, gpus.count())
        self.worker = ApiSupervisor(
            settings, self._write_state, worker_command or api_worker_command(settings)
        )
        self.store: Store | None = None
        self.registry = Registry(settings.paths.candidates_dir)
        self.scheduler: Any = None
        self.job: subprocess.Popen[bytes] | None = None
        self.job_run_id: str | None = None
        self.job_started: float | None = None
        self.job_is_trial = False
        self.job_started_at: datetime | None = None
        self.trials = experiments.enabled(settings, self.plan.development)
        self.no_trial_because: str | None = None
        # Settling opens Optuna's storage (about 0.1 s here): only after a trial's run ended
        # (and once at start, for one a previous daemon left), not on every poll.
        self._settle_due = True
        # The feedback count at which the study said no: nothing changes that before new data.
        self._no_trial_at: int | None = None
        # Set to run a dispatch now instead of at the next poll (a trial must yield).
        self._wake = asyncio.Event()
        # The embedded model's answers to the replay prompts, which every run mixes in: made
        # here once the API is up, so the person chats while they are made (in `doctor` they
        # held the first chat back 155 s); runs wait for them.
        self.answers: subprocess.Popen[bytes] | None = None
        self.answers_started: float | None = None
        self.answers_paused = False  # SIGSTOPped while the person chats (_answers_guard)
        self._answers_due = settings.model.base_model == EMBEDDED_MODEL
        self._answers_said = False  # "preparing ..." logged (not when the cache was there)
        self._told_waiting: set[str] = set()
        self.errors: deque[dict[str, str]] = deque(maxlen=20)
        self.started_at = datetime.now(UTC)
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle

    async def __aenter__(self) -> Daemon:
        self._lock.acquire()  # HomeBusy: nothing else was touched
        try:
            self.state = RunState.STARTING
            self.settings.paths.create()
            self._write_state()
            self.store = Store(self.settings.db_url)
            jobs.reap_dead_runs(self.store)
            promotion.audit_unrecorded_swap(self.store, self.registry)
            stop_leftover_worker(self.settings)
            log.info(
                "device plan: production %s, development %s (%d GPU(s))",
                self.plan.production,
                self.plan.development,
                self.plan.gpu_count,
            )
            schedule.RUNNING[str(self.settings.paths.root)] = self.settings
            self._start_scheduler()
            self._tasks = [
                asyncio.create_task(self.worker.run(self._stopping), name="worker"),
                asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            ]
            if self.trials:
                self._tasks.append(asyncio.create_task(self._trial_guard(), name="trial guard"))
            self._tasks.append(asyncio.create_task(self._answers_guard(), name="answers guard"))
            self.state = RunState.RUNNING
            self._write_state()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    def stop(self) -> None:
        """Ask the daemon to stop (signal handlers call this); serve() then returns."""
        if not self._stopping.is_set():
            log.info("stopping")
            self._stopping.set()

    async def serve(self) -> None:
        await self._stopping.wait()

    async def _shutdown(self) -> None:
        self.state = RunState.STOPPING
        self._stopping.set()
        self._write_state()
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(wait=False)
        schedule.RUNNING.pop(str(self.settings.paths.root), None)
        # Let the loops see `stopping` and finish their iteration (a dispatch in a thread
        # cannot be interrupted: cancelling it could start a job after _cancel_job ran).
        if self._tasks:
            _done, late = await asyncio.wait(self._tasks, timeout=30)
            for task in late:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # A trial stopped here is asked again by the next daemon; a real run failed.
        status = "cancelled" if self.job_is_trial else "failed"
        await asyncio.to_thread(self._cancel_job, "the daemon is stopping", status)
        if self.answers is not None:  # the next daemon starts them again; nothing half-written
            with contextlib.suppress(OSError):  # is read: the cache file is written whole
                os.kill(self.answers.pid, signal.SIGCONT)  # a stopped process takes no SIGTERM
            self.answers.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.answers.wait, 10)
            if self.answers.poll() is None:
                self.answers.kill()
        await asyncio.to_thread(self.worker.stop)
        if self.store is not None:
            self.store.close()
        self.state = RunState.STOPPED
        self._write_state()
        self._lock.release()
        log.info("stopped")

    # -- status

    def _error(self, message: str) -> None:
        self.errors.append({"at": datetime.now(UTC).isoformat(), "error": message})

    def _write_state(self) -> None:
        if not self._lock.held:
            return  # not ours (HomeBusy): never overwrite the running daemon's state
        jobs_out = []
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                for job in self.scheduler.get_jobs():
                    jobs_out.append(
                        {
                            "id": job.id,
                            "trigger": str(job.trigger),
                            "next_run_at": job.next_run_time.isoformat()
                            if job.next_run_time
                            else None,
                        }
                    )
        state = {
            "state": self.state.value,
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "updated_at": datetime.now(UTC).isoformat(),
            "home": str(self.settings.paths.root),
            "devices": {
                "production": self.plan.production,
                "development": self.plan.development,
                "gpus": self.plan.gpu_count,
                "shared_gpu": self.plan.shared_gpu,
            },
            "worker": self.worker.snapshot(),
            "schedule": jobs_out,
            "training": {
                "run_id": self.job_run_id,
                "pid": self.job.pid if self.job else None,
                "trial": self.job_is_trial,
            },
            # What training waits for before its first run on this home (None: nothing).
            "preparing": "base answers" if self.answers is not None else None,
            "preparing_paused": self.answers_paused,  # while the person chats
            "experiments": {"enabled": self.trials, "waiting_because": self.no_trial_because},
            "errors": list(self.errors),
        }
        path = state_file(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(state, indent=1) + "\n")

    # -- the schedule

    def _start_scheduler(self) -> None:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger

        cfg = self.settings.schedule
        self.scheduler = AsyncIOScheduler(
            jobstores={
                "default": SQLAlchemyJobStore(url=self.settings.db_url, tablename="schedule_jobs")
            },
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        # Paused while the jobs are reconciled: a nightly run missed while the machine was
        # off is still in the store with its old next-run time, and must not be replaced.
        self.scheduler.start(paused=True)
        home = str(self.settings.paths.root)
        wanted = {
            "nightly": (schedule.nightly, cfg.nightly_cron, cfg.missed_run_grace_s),
            "retention": (schedule.retention, cfg.retention_cron, 3600),
            "weekly_report": (schedule.weekly_report, cfg.weekly_report_cron, 6 * 3600),
        }
        for job_id, (func, cron, grace) in wanted.items():
            trigger = CronTrigger.from_crontab(cron)
            existing = self.scheduler.get_job(job_id)
            if existing is not None and str(existing.trigger) == str(trigger):
                existing.modify(args=[home], misfire_grace_time=grace)
                log.info("schedule: %s kept (next run %s)", job_id, existing.next_run_time)
            else:
                job = self.scheduler.add_job(
                    func,
                    trigger,
                    id=job_id,
                    name=job_id,
                    args=[home],
                    misfire_grace_time=grace,
                    replace_existing=True,
                )
                log.info("schedule: %s at %r (next run %s)", job_id, cron, job.next_run_time)
        self.scheduler.resume()

    # -- training runs

    async def _dispatch_loop(self) -> None:
        """Every poll: finish/kill the running job, trigger on new feedback, start the next
        queued run, and let the ratings judge the last promotion."""
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self._dispatch_once)
            except Exception as exc:  # the loop must outlive any one bad poll
                log.exception("dispatch failed")
                self._error(f"dispatch: {exc}")
            self._write_state()
            if self.scheduler is not None and self.scheduler.running:
                # The job store is read again every poll: a job made due in the store by
                # another process (the week benchmark's clock, a hand-edited schedule) runs
                # within a poll instead of at the scheduler's own next wake-up.
                self.scheduler.wakeup()
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait(
                {wake, stop},
                timeout=self.settings.daemon.poll_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in (wake, stop):
                waiter.cancel()

    async def _trial_guard(self) -> None:
        """While a trial runs: check twice a second whether it must yield, and wake the
        dispatcher to stop it (a poll of daemon.poll_s would let chat wait that long)."""
        while not self._stopping.is_set():
            if self.job_is_trial and self.job_run_id is not None:
                try:
                    if await asyncio.to_thread(self._trial_stop_reason):
                        self._wake.set()
                except Exception:
                    log.exception("trial guard")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.5)

    async def _answers_guard(self) -> None:
        """While the base answers are made: pause them (SIGSTOP) whenever the person chats,
        resume (SIGCONT) after ANSWERS_IDLE_S of quiet. Beside the API worker on the same two
        cores, even at nice 19, both ran at a third of their speed: a chat answer took 25-50 s
        instead of 8."""
        # Until the answers were started and have ended: nothing to guard after that.
        while not self._stopping.is_set() and (self._answers_due or self.answers is not None):
            process = self.answers
            if process is not None and process.poll() is None and self.store is not None:
                try:
                    busy = await asyncio.to_thread(self._chatting)
                    if busy != self.answers_paused:
                        os.kill(process.pid, signal.SIGSTOP if busy else signal.SIGCONT)
                        self.answers_paused = busy
                        self._write_state()
                except Exception:  # e.g. the process ended meanwhile: the next poll sees it
                    log.debug("answers guard", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.5)

    def _chatting(self) -> bool:
        assert self.store is not None
        return self.store.answering_now() or not self._chat_idle(ANSWERS_IDLE_S)

    def _trial_stop_reason(self) -> str | None:
        run_id, started = self.job_run_id, self.job_started_at
        if not self.job_is_trial or run_id is None or started is None or self.store is None:
            return None
        return experiments.stop_reason(
            self.settings, self.store, run_id, started, self.plan.shared_device
        )

    def _dispatch_once(self) -> None:
        assert self.store is not None
        if self.job is not None:
            self._check_job()
        jobs.reap_dead_runs(self.store)
        schedule.enqueue_on_feedback(self.settings, self.store)
        if self.job is not None and self.job_is_trial:
            why = self._trial_stop_reason()
            if why:
                self._cancel_job(f"recipe trial stopped: {why}", status="cancelled")
        if self.trials and self._settle_due:
            for line in experiments.settle(self.settings, self.store, self.registry):
                if "failed" in line:
                    self._error(line)
            self._settle_due = False
        # Before a run starts: a night must not build on an adapter the person's ratings
        # are about to roll back.
        reason = watch.check(self.settings, self.store, self.registry)
        if reason:
            self._error(f"rolled back after promotion: {reason}")
        if self.answers is not None:
            self._check_answers()
        elif self._answers_due and self.job is None and self.worker.state == "up":
            self._start_answers()
        if self.answers is not None:
            self._tell_waiting()
            return
        if self.job is None and not self._stopping.is_set():
            self._start_next()
        if self.job is None and self.trials and not self._stopping.is_set():
            self._start_trial()

    def _start_answers(self) -> None:
        """`python -m development.base_answers` on the development device (it returns at
        once when the cache is there)."""
        env = devices.child_env(self.settings, "development")
        logfile = self.settings.paths.logs_dir / "base-answers.log"
        argv = [sys.executable, "-m", "development.base_answers", "--quiet", "--background"]
        argv += ["--home", str(self.settings.paths.root)]
        argv += ["--device", env["WHETSTONE_WORKER_DEVICE"]]
        with open(logfile, "ab") as out:
            try:
                self.answers = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_killed_with(os.getpid()) if sys.platform == "linux" else None,
                )
            finally:
                # Not due once the process is there: this runs in the dispatch thread, and
                # _answers_guard, on the event loop, ends for good when it sees neither (a
                # fork on two busy cores takes long enough for it to look in between).
                self._answers_due = False
        self.answers_started = time.monotonic()

    def _check_answers(self) -> None:
        assert self.answers is not None
        code = self.answers.poll()
        elapsed = time.monotonic() - (self.answers_started or time.monotonic())
        if code is None:
            if elapsed >= 5 and not self._answers_said:
                self._answers_said = True
                log.info(
                    "preparing the base model's answers to the replay prompts (log: %s); "
                    "training runs wait for them, chat does not",
                    self.settings.paths.logs_dir / "base-answers.log",
                )
            return
        self.answers = self.answers_started = None
        self.answers_paused = False
        if code == 0:
            if self._answers_said:
                log.info("the base model's answers are ready (%.0f s)", elapsed)
        else:  # the first run makes them itself, as on a home without a daemon
            self._error(
                f"preparing the base model's answers failed (exit {code}, "
                f"{self.settings.paths.logs_dir / 'base-answers.log'}); the first run makes them"
            )

    def _tell_waiting(self) -> None:
        """Say once per queued run that it waits for the answers."""
        assert self.store is not None
        for run in self.store.list_runs(limit=5, status="queued"):
            if run.id not in self._told_waiting:
                self._told_waiting.add(run.id)
                log.info("run %s waits for the base model's answers to the replay prompts", run.id)

    def _start_next(self) -> None:
        assert self.store is not None
        queued = self.store.list_runs(limit=20, status="queued")
        queued = [run for run in queued if run.pid is None]
        for run in [r for r in queued if r.trigger == schedule.EXPERIMENT_TRIGGER]:
            # A trial queued by a daemon that died before starting it: the study asks again.
            self.store.update_run(run.id, status="cancelled", reason="never started")
            queued.remove(run)
            self._settle_due = True
        if not queued:
            return
        run = queued[-1]  # oldest first
        if self.plan.shared_gpu and not self._chat_idle():
            return
        try:
            args = (run.progress or {}).get("args") or []
            run_id, process = jobs.start_training(
                self.settings,
                self.store,
                run.profile,
                trigger=run.trigger,
                run_id=run.id,
                extra_args=[str(a) for a in args],
            )
        except jobs.JobBusy as exc:
            log.info("%s", exc)  # a `whetstone train` started outside the daemon: wait
            return
        except ConfigError as exc:  # a profile removed from the config since it was queued
            self.store.update_run(run.id, status="failed", error=str(exc))
            return
        self._took(process, run_id, trial=False)

    def _took(self, process: subprocess.Popen[bytes], run_id: str, *, trial: bool) -> None:
        self.job, self.job_run_id, self.job_started = process, run_id, time.monotonic()
        self.job_started_at, self.job_is_trial = datetime.now(UTC), trial
        self._write_state()

    def _start_trial(self) -> None:
        """A recipe trial when the development device is idle: nothing queued, chat idle on
        a shared device, and the nightly run not due within experiments.pause_before_nightly_s."""
        assert self.store is not None
        feedback = self.store.count_feedback_since(None)
        if feedback == self._no_trial_at:
            return  # no_trial_because still says why
        self.no_trial_because = self._trial_blocker()
        if self.no_trial_because:
            return
        try:
            run_id, number, args = experiments.start_trial(self.settings, self.store)
        except experiments.NoTrial as exc:
            self.no_trial_because, self._no_trial_at = str(exc), feedback
            return
        try:
            run_id, process = jobs.start_training(
                self.settings,
                self.store,
                experiments.searched_profile(self.settings),
                trigger=schedule.EXPERIMENT_TRIGGER,
                run_id=run_id,
                extra_args=args,
            )
        except (jobs.JobBusy, OSError) as exc:
            # The trial's run never started: settle() tells the study, which asks it again.
            self.store.update_run(run_id, status="cancelled", reason=str(exc))
            self.no_trial_because = str(exc)
            self._settle_due = True
            return
        log.info("recipe trial #%d started as run %s", number, run_id)
        self._took(process, run_id, trial=True)

    def _trial_blocker(self) -> str | None:
        assert self.store is not None
        if self.store.list_runs(
            limit=1, status="queued", except_trigger=schedule.EXPERIMENT_TRIGGER
        ):
            return "a run is queued"
        if self.plan.shared_device and not self._chat_idle():
            return "the person chatted recently on the shared device"
        pause = self.settings.experiments.pause_before_nightly_s
        nightly = self.scheduler.get_job("nightly") if self.scheduler is not None else None
        if nightly is not None and nightly.next_run_time is not None:
            due = (nightly.next_run_time - datetime.now(UTC)).total_seconds()
            if due < pause:
                return f"the nightly run is due in {int(due)} s"
        return None

    def _chat_idle(self, idle_s: float | None = None) -> bool:
        """No chat message for `idle_s` (default schedule.idle_before_training_s: one GPU for
        both trains only when the person has not chatted for a while)."""
        assert self.store is not None
        last = self.store.last_message_at()
        if last is None:
            return True
        if idle_s is None:
            idle_s = self.settings.schedule.idle_before_training_s
        return (datetime.now(UTC) - last).total_seconds() >= idle_s

    def _check_job(self) -> None:
        assert self.job is not None and self.store is not None
        code = self.job.poll()
        elapsed = time.monotonic() - (self.job_started or time.monotonic())
        if code is None:
            limit = self.settings.schedule.job_timeout_s
            if elapsed > limit:
                self._cancel_job(f"timed out after {int(elapsed)} s (schedule.job_timeout_s)")
            else:
                self._follow_next_run()
            return
        self._follow_next_run()
        run_id = self.job_run_id
        self._released()
        run = self.store.get_run(run_id)
        if run.status in ("running", "queued"):
            error = f"the training process exited with code {code} without reporting"
            self.store.update_run(run_id, status="failed", error=error)
            run = self.store.get_run(run_id)
        # The outcome in words: "succeeded" alone read the same for a promotion and a reject.
        outcome = outcome_line(run_outcome(self.store, run))
        log.info("run %s ended (exit %s, %.0f s): %s", run_id, code, elapsed, outcome)
        if run.status == "failed":
            self._error(f"run {run_id} failed: {run.error}")

    def _follow_next_run(self) -> None:
        """The job's process goes on with a catch-up run after a promotion, or a retry after a
        refusal (development.train.follow_up): say how the first run ended, and watch the one
        it carries out now."""
        assert self.store is not None and self.job_run_id is not None
        run = self.store.get_run(self.job_run_id)
        following = (run.progress or {}).get("next_run")
        if run.status not in RUN_FINISHED or not following:
            return
        log.info("run %s ended: %s", run.id, outcome_line(run_outcome(self.store, run)))
        log.info("run %s follows it in the same process", following)
        self.job_run_id = following

    def _released(self) -> None:
        self._settle_due = self._settle_due or self.job_is_trial
        self.job = self.job_run_id = self.job_started = self.job_started_at = None
        self.job_is_trial = False

    def _cancel_job(self, why: str, status: str = "failed") -> None:
        """SIGTERM the running job (it marks itself failed and removes its scratch), SIGKILL
        it if it does not stop within daemon.stop_timeout_s; the run records `why` and ends
        as `status` (failed, or cancelled for a trial that yielded)."""
        if self.job is None or self.store is None:
            return
        job, run_id = self.job, self.job_run_id
        assert run_id is not None
        log.warning("stopping run %s: %s", run_id, why)
        # Recorded first: the job reads it when it marks itself failed, so whoever watches
        # the run sees why it stopped as soon as it has. A cancelled trial is marked so
        # before the signal: the job leaves a cancelled run as it is, so the run never
        # shows `failed` while the job is exiting.
        if status == "cancelled":
            self.store.update_run(run_id, reason=why, status="cancelled", error=None)
        else:
            self.store.update_run(run_id, reason=why)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGTERM)
        try:
            code = job.wait(self.settings.daemon.stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            code = job.wait()
        run = self.store.get_run(run_id)
        if status == "cancelled":
            if run.status not in ("cancelled", "succeeded"):  # it had not marked itself running
                self.store.update_run(run_id, status="cancelled", error=None)
            log.info("run %s: %s (exit %s)", run_id, why, code)
        elif run.status in ("running", "queued") or why not in (run.error or ""):
            error = f"{why} (exit {code})" + (f"; {run.error}" if run.error else "")
            self.store.update_run(run_id, status="failed", error=error)
        self._released()
        if status != "cancelled":
            self._error(f"run {run_id}: {why}")


async def run_daemon(settings: Settings) -> int:
    """`whetstone up`: run until SIGTERM/SIGINT; 0 on a clean stop."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(settings)
    async with daemon:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        log.info(
            "whetstone up: API at %s (home %s); chat: %s chat --home %s",
            daemon.worker.url,
            settings.paths.root,
            whetstone_command(),
            settings.paths.root,
        )
        await daemon.serve()
    return 0
