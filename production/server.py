"""The API worker's process: an OpenAI-compatible chat API over the base model + the current
adapter (the app itself is production.api).

    python -m production.server --home ~/.local/share/whetstone [--host 127.0.0.1] [--port 8321]

`whetstone serve` runs exactly this, with CUDA_VISIBLE_DEVICES set for the production device
before torch is imported. Every exchange is stored: the user turn and an answer placeholder
before generation starts, the answer as it streams (flushed every second) and when it ends;
an answer cut short by a disconnect or a dead worker is kept and marked `cut_off`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from common.config import Settings, check_bind
from common.entrypoint import (
    add_settings_arguments,
    exit_on_config_error,
    log_to_stderr,
    settings_from_args,
)
from common.fs import atomic_write_text
from production.api.app import create_app
from production.api.service import Service, build_service
from production.model.device_pin import pin_device

log = logging.getLogger(__name__)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's Server, except that a SIGTERM or SIGINT it caught stops the server and
    nothing more. uvicorn raises the signal again once it has stopped, which killed the
    process before main() stopped the generation thread and closed the store."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                try:
                    yield
                finally:
                    if self._captured_signals:
                        log.info("stopping on signal %s", self._captured_signals[-1])
                    self._captured_signals.clear()

    return Server(config)


async def _serve(settings: Settings, service: Service) -> None:
    import uvicorn

    app = create_app(service, on_shutdown=lambda: _forget_address(settings))
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="warning",
        lifespan="on",
    )
    server = _uvicorn_server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        sock = server.servers[0].sockets[0]
        port = sock.getsockname()[1]
        info = {
            "url": settings.server.model_copy(update={"port": port}).local_url,
            "host": settings.server.host,
            "port": port,
            "pid": os.getpid(),
            "started_at": service.started_at.isoformat(),
        }
        _write_json_atomic(settings.paths.server_file, info)
        log.info("serving %s at %s", service.engine.base_model_name, info["url"])
    parent = os.environ.get(PARENT_ENV)
    watchdog = None
    if parent:
        die_with_parent(int(parent), on=False)
        watchdog = asyncio.create_task(_exit_with_parent(server, int(parent)))
    try:
        await task
    finally:
        if watchdog is not None:
            watchdog.cancel()
        _forget_address(settings)


# Set by the daemon: its pid. A worker whose daemon died (kill -9, OOM) stops by itself
# instead of holding the port against the next daemon.
PARENT_ENV = "WHETSTONE_DAEMON_PID"


# A worker whose daemon died gives the streams in flight this long, then cuts them: nobody
# restarts it or waits for it, and a long answer kept it alive for minutes.
ORPHAN_GRACE_S = 5


async def _exit_with_parent(server: Any, parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the daemon (pid %d) is gone; stopping", parent)
    server.config.timeout_graceful_shutdown = ORPHAN_GRACE_S
    server.should_exit = True


def die_with_parent(parent: int, *, on: bool = True) -> None:
    """While the model loads (before the watchdog above runs), the kernel ends this worker
    when the daemon dies (Linux prctl PR_SET_PDEATHSIG). Turned off once serving: SIGTERM
    then means uvicorn's unbounded graceful stop, and the watchdog bounds it instead."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM if on else 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the watchdog alone
    if on and os.getppid() != parent:  # died before the call: no signal will come
        raise SystemExit(f"the daemon (pid {parent}) is gone")


def _forget_address(settings: Settings) -> None:
    """Remove the recorded address if it is ours (a newer worker may have replaced it)."""
    if (settings.paths.server_record() or {}).get("pid") == os.getpid():
        settings.paths.server_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whetstone API worker.")
    add_settings_arguments(parser)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    server = {"host": args.host, "port": args.port}
    settings = settings_from_args(
        args, {"server": {k: v for k, v in server.items() if v is not None}}
    )
    with exit_on_config_error():
        check_bind(settings)
    log_to_stderr(settings)
    from common.config import log_resolved

    log_resolved(settings)
    if settings.server.port != 0:
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.server.host, settings.server.port))
        except OSError as exc:
            sys.stderr.write(
                f"error: cannot listen on {settings.server.host}:"
                f"{settings.server.port}: {exc.strerror}\n"
            )
            return 2
        finally:
            probe.close()
    if os.environ.get(PARENT_ENV):
        die_with_parent(int(os.environ[PARENT_ENV]))
    device = pin_device(settings, "production")
    service = build_service(settings, device)
    try:
        asyncio.run(_serve(settings, service))
    except KeyboardInterrupt:
        pass
    finally:
        service.worker.stop()
        service.writes.shutdown(wait=True)  # the last answers' writes land before the store closes
        service.store.close()
        log.info("stopped: generation thread joined, store closed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
