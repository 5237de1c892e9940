"""The real daemon (`whetstone up`) in a subprocess, on the CPU with the embedded model, in a
tmp home: it supervises the API worker, refuses a second instance, gives up on a crash loop
with the reason in status, stops cleanly on SIGTERM (also mid-training), triggers runs on new
feedback, and keeps its nightly job across restarts.

Each test starts at least one daemon (a worker loading the model: seconds), so all are slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from candidates import Registry
from common.config import load_settings
from common.fs import pid_alive
from data.store import Store
from tests.conftest import REPO, kill_training_processes, run_cli
from tests.scripted_person import store_corrections, taught

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "orchestrator.cli"]
FAST = """
[daemon]
poll_s = 0.5
restart_backoff_s = 0.2
restart_backoff_max_s = 1.0
stop_timeout_s = 30
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not within {timeout} s")


class DaemonProcess:
    """`whetstone up` on a free port in `home`."""

    def __init__(self, home: Path, port: int | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home / "daemon-test.log", "ab")  # noqa: SIM115 (closed in stop)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")}
        self.proc = subprocess.Popen(
            [*CLI, "up", "--home", str(home), "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.home / "run" / "daemon.json").read_text())
        except (OSError, ValueError):
            return {}

    def worker_up(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
        worker = self.state().get("worker") or {}
        return worker if worker.get("state") == "up" else None

    def wait_ready(self, timeout: float = 120) -> DaemonProcess:
        wait_for("the API worker up", self.worker_up, timeout)
        return self

    def output(self) -> str:
        self.log.flush()
        return (self.home / "daemon-test.log").read_text(errors="replace")

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM; the exit code (it must come within `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons; every one (and any training job it left) is stopped at the end."""
    started: list[DaemonProcess] = []

    def start(home: Path, port: int | None = None) -> DaemonProcess:
        config = home / "config.toml"
        if not config.exists():
            config.write_text(FAST)
        proc = DaemonProcess(home, port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        kill_training_processes(proc.home)


def chat(url: str, text: str) -> str:
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()["id"]


def status_json(home: Path) -> dict[str, Any]:
    result = run_cli("status", "--home", str(home), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_daemon_restarts_a_killed_worker_and_refuses_a_second_up(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    daemon = daemons(home_for_training).wait_ready()
    assert httpx.get(f"{daemon.url}/health", timeout=5).status_code == 200
    first = chat(daemon.url, "Say hello.")

    second = run_cli("up", "--home", str(home_for_training), "--port", str(free_port()))
    assert second.returncode == 1
    assert f"pid {daemon.proc.pid}" in second.stderr and "already" not in second.stdout
    assert "another `whetstone up`" in second.stderr

    old_pid = daemon.worker_up()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    started = time.monotonic()
    worker = wait_for(
        "a restarted worker",
        lambda: (w := daemon.worker_up()) and w["pid"] not in (None, old_pid) and w,
        timeout=90,
    )
    restart_s = time.monotonic() - started
    assert worker["restarts"] == 1
    later = chat(daemon.url, "Say goodbye.")

    status = status_json(home_for_training)
    assert status["run_state"] == "running"
    assert status["daemon"]["worker"]["state"] == "up"
    assert status["daemon"]["devices"] == {
        "production": "cpu",
        "development": "cpu",
        "gpus": 0,
        "shared_gpu": False,
    }
    api_status = httpx.get(f"{daemon.url}/v1/status", timeout=5).json()
    assert api_status["daemon"]["state"] == "running"

    assert daemon.terminate() == 0
    assert json.loads((home_for_training / "run" / "daemon.json").read_text())["state"] == "stopped"
    store = Store(load_settings(home_for_training).db_url)
    try:
        assert store.get_message(first).content and store.get_message(later).content
    finally:
        store.close()
    print(f"worker back {restart_s:.1f} s after kill -9")


def test_a_crash_loop_stops_with_the_reason_in_status(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    (home_for_training / "config.toml").write_text(FAST + "max_restarts = 2\n")
    with socket.socket() as taken:  # the worker's port is taken: it exits at every start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon = daemons(home_for_training, port=taken.getsockname()[1])
        worker = wait_for(
            "the worker given up",
            lambda: (w := daemon.state().get("worker") or {}).get("state") == "failed" and w,
            timeout=60,
        )
        assert worker["crashes_in_row"] == 3
        status = status_json(home_for_training)
    assert status["run_state"] == "running"  # the daemon stays up and says why
    error = status["daemon"]["worker"]["last_error"]
    assert "crashed 3 times in a row" in error and "cannot listen" in error, error
    human = run_cli("status", "--home", str(home_for_training))
    # The table folds long cells at the terminal's width, wherever a long home path puts the
    # break: read it as the words a person sees.
    words = " ".join(human.stdout.split())
    assert "cannot listen" in words and "failed" in words, human.stdout
    assert daemon.terminate() == 0


def test_sigterm_during_training_stops_cleanly_and_marks_the_run(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    # No paraphrases of the corrected questions (training.correction_variants): the model
    # writing them for 32 questions is a wait before the first step that this is not about.
    (home_for_training / "config.toml").write_text(
        FAST + "\n[schedule]\nevery_n_feedback = 0\n\n[training]\ncorrection_variants = 0\n"
    )
    store_corrections(home_for_training, taught(32))
    daemon = daemons(home_for_training).wait_ready()
    queued = run_cli("train", "--home", str(home_for_training), "--profile", "quick_test")
    assert queued.returncode == 0, queued.stderr
    assert "with the daemon" in queued.stdout, queued.stdout
    run_id = queued.stdout.split()[1]  # "queued run_... (quick_test) with the daemon"
    store = Store(load_settings(home_for_training).db_url)
    try:

        def training() -> Any:
            run = store.get_run(run_id)
            return run.status == "running" and (run.progress or {}).get("step", 0) >= 1 and run

        run = wait_for("a training step", training, timeout=300)
        pid = run.pid
        started = time.monotonic()
        assert daemon.terminate(timeout=120) == 0
        stop_s = time.monotonic() - started
        run = store.get_run(run.id)
    finally:
        store.close()
    assert run.status == "failed" and "daemon is stopping" in run.error, run.error
    assert Registry(home_for_training / "candidates").list() == []
    leftovers = [p.name for p in (home_for_training / "candidates").iterdir()]
    assert leftovers == [], leftovers
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    print(f"stopped {stop_s:.1f} s after SIGTERM")


def test_every_n_feedback_queues_a_run_and_too_little_data_is_skipped(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    (home_for_training / "config.toml").write_text(
        FAST + "\n[schedule]\nevery_n_feedback = 3\nmin_new_examples = 8\n"
    )
    daemon = daemons(home_for_training).wait_ready()
    for index in range(3):
        message_id = chat(daemon.url, f"Question number {index}?")
        assert daemon.state()["training"]["run_id"] is None
        resp = httpx.post(
            f"{daemon.url}/v1/feedback",
            json={"message_id": message_id, "rating": 5},
            timeout=10,
        )
        resp.raise_for_status()
    store = Store(load_settings(home_for_training).db_url)
    try:
        run = wait_for(
            "a skipped feedback run",
            lambda: (r := store.latest_run()) and r.status == "skipped" and r,
            timeout=120,
        )
        assert run.trigger == "feedback" and run.profile == "quick_test"
        assert "8" in run.reason, run.reason
        time.sleep(2)  # no second run for the same three items
        assert len(store.list_runs()) == 1
    finally:
        store.close()
    assert daemon.terminate() == 0
    assert f"run {run.id} ended (exit 0" in daemon.output()
    assert f"s): skipped: {run.reason}" in daemon.output()
    # The terminal is spared the kilobytes of resolved config and apscheduler's echo of the
    # schedule; the log file keeps the config.
    assert "resolved config: {" not in daemon.output() and "Added job" not in daemon.output()
    assert "resolved config: {" in (home_for_training / "logs" / "daemon.log").read_text()


def test_a_hung_job_is_killed_after_the_timeout_and_train_wait_reports_it(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    (home_for_training / "config.toml").write_text(
        FAST + "\n[schedule]\nevery_n_feedback = 0\njob_timeout_s = 4\n"
    )
    store_corrections(home_for_training, taught(32))
    daemons(home_for_training).wait_ready()
    result = run_cli(
        "train", "--home", str(home_for_training), "--profile", "quick_test", "--wait", timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "timed out after" in result.stderr and "job_timeout_s" in result.stderr
    store = Store(load_settings(home_for_training).db_url)
    try:
        run = store.latest_run()
    finally:
        store.close()
    assert run.status == "failed" and run.trigger == "manual"
    wait_for(
        "the job's process gone", lambda: not pid_alive(run.pid, "development.train"), timeout=60
    )
    assert Registry(home_for_training / "candidates").list() == []


def test_a_worker_whose_daemon_was_killed_stops_within_seconds(
    home_for_training: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """kill -9 of the daemon while the worker streams a long answer: the orphaned worker
    cuts the stream after a short grace and exits (it used to run on for minutes, holding
    the port and a core)."""
    import threading

    daemon = daemons(home_for_training).wait_ready()
    worker_pid = daemon.worker_up()["pid"]
    streamed: list[str] = []

    def long_answer() -> None:
        body = {
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 2000,
            "temperature": 0,
            "stream": True,
        }
        try:
            with httpx.stream(
                "POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=300
            ) as response:
                for line in response.iter_lines():
                    streamed.append(line)
        except httpx.HTTPError:
            pass

    reader = threading.Thread(target=long_answer, daemon=True)
    reader.start()
    wait_for("the stream to start", lambda: len(streamed) > 3, timeout=120)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    killed = time.monotonic()
    wait_for("the orphaned worker to exit", lambda: not _alive(worker_pid), timeout=30)
    print(f"worker gone {time.monotonic() - killed:.1f} s after the daemon's kill -9")
    # The client is not left waiting on a dead worker: its stream ended with it.
    reader.join(timeout=30)
    assert not reader.is_alive()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_the_first_chat_does_not_wait_for_the_base_answers_and_a_run_does(
    home_with_model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """A fresh home (as after `make run`'s doctor): the daemon makes the base model's answers
    to the replay prompts once the API is up. The person chats meanwhile; a run waits, and
    the log and status say so. Stopped mid-way, nothing half-written is left to be read."""
    (home_with_model / "config.toml").write_text(FAST + "\n[schedule]\nevery_n_feedback = 0\n")
    daemon = daemons(home_with_model).wait_ready()
    wait_for("the answers to be in the making", lambda: daemon.state().get("preparing"))
    assert chat(daemon.url, "What is 2 + 2?")  # answered while they are made
    # ... which pause while the person chats: on two cores they slowed the answer ten-fold.
    wait_for("the answers to pause", lambda: daemon.state().get("preparing_paused"), 10)
    queued = run_cli("train", "--home", str(home_with_model), "--force")
    assert queued.returncode == 0, queued.stderr
    wait_for(
        "the run to say it waits", lambda: "waits for the base model's answers" in daemon.output()
    )
    status = run_cli("status", "--home", str(home_with_model), env={"COLUMNS": "200"})
    assert "the base model's answers to the replay prompts (runs wait for them)" in status.stdout
    store = Store(load_settings(home_with_model).db_url)
    try:
        assert [r.status for r in store.list_runs()] == ["queued"]
    finally:
        store.close()
    assert daemon.terminate() == 0
    replay = home_with_model / "models" / "replay"
    assert not replay.exists() or not [p for p in replay.iterdir() if p.suffix == ".json"]


def _answers_process(home: Path) -> int | None:
    """The pid of the home's base-answers process, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"development.base_answers" in argv and str(home).encode() in argv:
            return int(entry.name)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_daemon_takes_its_paused_base_answers_with_it(
    home_with_model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """kill -9 of the daemon while the base answers are paused for a chat (SIGSTOPped, and a
    stopped process takes no signal but SIGKILL): the answers process goes too (it used to
    stay stopped for good, holding the model's memory)."""
    (home_with_model / "config.toml").write_text(FAST + "\n[schedule]\nevery_n_feedback = 0\n")
    daemon = daemons(home_with_model).wait_ready()
    wait_for("the answers to be in the making", lambda: daemon.state().get("preparing"))
    answers = _answers_process(home_with_model)
    assert answers is not None and _alive(answers)
    assert chat(daemon.url, "What is 2 + 2?")
    wait_for("the answers to pause", lambda: daemon.state().get("preparing_paused"), 10)
    assert "State:\tT" in Path(f"/proc/{answers}/status").read_text()  # stopped
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    wait_for("the stopped answers process to go", lambda: not _alive(answers), timeout=10)
