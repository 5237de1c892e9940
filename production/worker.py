"""One thread owns the model: requests queue fairly (FIFO), adapter swaps run between them.

The HTTP handlers live on the asyncio loop; each generation streams its deltas back through
an asyncio.Queue fed with `call_soon_threadsafe`. A swap is a job like any other but jumps
the queue, so it happens right after the generation in flight finishes: that generation
completes on the adapter it started with, the next one uses the new adapter. Stopping jumps
ahead of both: the generation in flight is cut off (kept as it stands, as a restart keeps
it), and every request still waiting is told the server is stopping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from production.engine import Engine, Outcome, Sampling

log = logging.getLogger(__name__)

# The priority queue's order: a stop first, then swaps, then generations (FIFO within each).
_STOP, _SWAP, _GENERATE = 0, 1, 2


class QueueFull(RuntimeError):
    """Too many requests are waiting for the model; the caller should retry later."""


class WorkerStopped(RuntimeError):
    """The server is stopping: the request was not (or not fully) answered; retry later."""


@dataclass
class Generation:
    """A request in flight: read `events` until ("done", Outcome) or ("error", exc)."""

    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_event.set()

    def _emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class GenerationWorker:
    """The one thread that runs generation: requests wait in a bounded priority queue and
    stream their tokens back to the event loop."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._waiting = 0
        self._lock = threading.Lock()
        self.busy = False
        self._stopping = threading.Event()
        self._current: Generation | None = None
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, prompt: list[int], sampling: Sampling) -> Generation:
        job = Generation(prompt, sampling, asyncio.get_running_loop())
        if self._stopping.is_set():
            raise WorkerStopped("the server is stopping")
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting for the model")
            self._waiting += 1
        self._jobs.put((_GENERATE, next(self._order), job))
        return job

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future[Any]:
        """Run fn(engine) on the generation thread between two generations."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((_SWAP, next(self._order), (fn, future)))
        return future

    def stop(self, timeout: float = 30) -> None:
        """Cut off the generation in flight, tell every waiting request the server is
        stopping, and end the thread (waiting up to `timeout` s for the cut-off answer)."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put((_STOP, next(self._order), None))
        self._thread.join(timeout=timeout)

    def _refuse_waiting(self) -> None:
        while True:
            try:
                kind, _, job = self._jobs.get_nowait()
            except queue.Empty:
                return
            stopped = WorkerStopped("the server is stopping")
            if kind == _SWAP:
                job[1].set_exception(stopped)
            elif kind == _GENERATE:
                with self._lock:
                    self._waiting -= 1
                job._emit("error", stopped)

    def _run(self) -> None:
        while True:
            kind, _, job = self._jobs.get()
            if kind == _STOP:
                self._refuse_waiting()
                return
            if kind == _SWAP:
                fn, future = job
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)
                continue
            with self._lock:
                self._waiting -= 1
            if job.cancel_event.is_set():
                job._emit("error", asyncio.CancelledError())
                continue
            self._generate(job)

    def _generate(self, job: Generation) -> None:
        self.busy = True
        self._current = job
        if self._stopping.is_set():  # stop() found no job in flight to cancel
            job.cancel()
        job.started.set()
        job._emit("start", self.engine.adapter_id)
        try:
            outcome: Outcome = self.engine.stream(
                job.prompt,
                job.sampling,
                on_delta=lambda delta: job._emit("delta", delta),
                cancelled=job.cancel_event.is_set,
            )
        except Exception as exc:
            log.exception("generation failed")
            job._emit("error", exc)
        else:
            job._emit("done", outcome)
        finally:
            self.busy = False
            self._current = None
