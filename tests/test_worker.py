"""The generation thread (production.worker) stops ahead of the queue: the answer in flight
is cut off as it stands, every request still waiting is told the server is stopping (a 503 to
retry, not an answer after the stop was asked for), and nothing new is taken."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.config import load_settings
from production.engine import Engine, Sampling
from production.worker import GenerationWorker, WorkerStopped
from tests.tiny_models import model_home, tiny_llama


async def _events(job) -> list[str]:
    kinds = []
    while True:
        kind, payload = await job.events.get()
        if kind != "delta":  # the text so far, as much as came before the stop
            kinds.append(kind)
        if kind == "done":
            return [*kinds, payload.finish_reason]
        if kind == "error":
            return [*kinds, type(payload).__name__]


def test_stop_cuts_the_answer_in_flight_and_refuses_the_waiting(tmp_path: Path) -> None:
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"))
    engine = Engine(load_settings(home), "cpu")
    prompt = engine.prompt_ids([{"role": "user", "content": "Tell me a story."}], None)
    # A random model never ends an answer: each of these would run its whole length.
    long = Sampling(temperature=0, max_tokens=4000)

    async def scenario() -> tuple[list[list[str]], bool]:
        worker = GenerationWorker(engine, max_queue=8)
        first = worker.submit(prompt, long)
        await asyncio.to_thread(first.started.wait, 60)
        waiting = [worker.submit(prompt, long) for _ in range(3)]
        swap = worker.call(lambda e: e.adapter_id)
        await asyncio.to_thread(worker.stop)
        ended = [await _events(job) for job in (first, *waiting)]
        with pytest.raises(WorkerStopped):
            worker.submit(prompt, long)
        return ended, isinstance(swap.exception(timeout=5), WorkerStopped)

    ended, swap_refused = asyncio.run(scenario())
    assert ended[0] == ["start", "done", "cancelled"]
    # None of the waiting requests started: each was told the server is stopping.
    assert ended[1:] == [["error", "WorkerStopped"]] * 3
    assert swap_refused
