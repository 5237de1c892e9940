"""Shared fixtures: tmp homes, and the embedded model prepared once per checkout.

The real SmolLM2-135M-Instruct is prepared from the wheel's GGUF once into .cache/ at the
repo root (about 25 s on two cores) and linked into each test home, so tests that need the
model pay the conversion once, and a fresh CI clone pays it once per run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("WHETSTONE_TEST_CACHE", REPO / ".cache" / "test-models"))

# No test may reach a hub: fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _clean_whetstone_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own WHETSTONE_* variables must not leak into tests."""
    for var in list(os.environ):
        if var.startswith("WHETSTONE_"):
            monkeypatch.delenv(var)


# The files whose tests take longest (measured: `pytest --durations=0`, 2026-12-07): they start
# first, so the two workers of `make test` (pytest-xdist) end together instead of one of them
# starting the longest test last.
LONGEST_FIRST = ("test_week.py", "test_catch_up.py", "test_learning.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def cost_rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (item.get_closest_marker("slow") is None)

    items.sort(key=cost_rank)  # stable: file order within each rank


@contextmanager
def preparing() -> Iterator[None]:
    """One preparer at a time: the workers of a parallel run share MODEL_CACHE, and the second
    one finds the first one's result instead of building it again."""
    from common import locks

    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    fd = locks.take(MODEL_CACHE / ".prepare.lock")
    try:
        yield
    finally:
        locks.release(fd)


@pytest.fixture(scope="session")
def prepared_model_dir() -> Path:
    """The embedded default model as safetensors, prepared once per checkout."""
    from common.home import Home
    from production.model.base_model import prepare_embedded

    with preparing():
        return prepare_embedded(Home(MODEL_CACHE), show_progress=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty whetstone home."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def link_model(home: Path, prepared_model_dir: Path) -> Path:
    """`home` (made if missing) with the prepared embedded model in its models/, linked, not
    copied."""
    models = home / "models"
    models.mkdir(parents=True)
    (models / prepared_model_dir.name).symlink_to(prepared_model_dir, target_is_directory=True)
    return home


@pytest.fixture
def home_with_model(home: Path, prepared_model_dir: Path) -> Path:
    """A home whose models/ already holds the prepared embedded model."""
    return link_model(home, prepared_model_dir)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the real `whetstone` CLI in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def run_in_triton_interpreter(code: str):
    """Run `code` in a fresh Python with TRITON_INTERPRET=1 (Triton reads it at import, so it
    cannot be set inside this process): the GPU's kernels on the CPU. Returns the
    CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


class ServerProcess:
    """A real `python -m production.server` on 127.0.0.1, stopped at the end of the test."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.home = home
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")}
        full_env.update(env or {})
        self.log = (home / "server-test.log").open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "production.server",
                "--home",
                str(home),
                "--port",
                str(self.port),
                *args,
            ],
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.home / "server-test.log").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def server(home_with_model: Path):
    """The API worker on the embedded model in a fresh home."""
    proc = ServerProcess(home_with_model).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base_answers_dir(prepared_model_dir: Path) -> Path:
    """The base model's answers to the shipped general prompts (replay, validation and
    regression probes), generated once per checkout beside the prepared model."""
    from common.config import load_settings
    from development import modeling, training_data

    settings = load_settings(MODEL_CACHE)
    with preparing():
        if not training_data.replay_cache_file(settings).is_file():
            model, tokenizer = modeling.load_base(settings, "cpu", for_training=False)
            training_data.load_base_answers(
                settings,
                lambda prompts: modeling.base_answers(model, tokenizer, settings, prompts),
            )
    return training_data.replay_cache_file(settings).parent


@pytest.fixture
def home_for_training(home_with_model: Path, base_answers_dir: Path) -> Path:
    """A home with the prepared model and the cached base answers (linked, not copied)."""
    (home_with_model / "models" / "replay").symlink_to(base_answers_dir, target_is_directory=True)
    return home_with_model


def kill_training_processes(home: Path) -> None:
    """A test that failed or timed out mid-run must not leave its training process (in its
    own session, so it outlives the CLI that waited on it) eating the CPU of later tests."""
    import contextlib
    import signal

    from common.config import load_settings
    from data.store import Store

    if not (home / "whetstone.db").exists():
        return
    store = Store(load_settings(home).db_url)
    try:
        for run in store.list_runs(limit=50):
            if run.pid and run.status in ("running", "queued"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(run.pid, signal.SIGKILL)
    finally:
        store.close()
