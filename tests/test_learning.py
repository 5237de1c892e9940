"""The loop on the real embedded model: a scripted person teaches facts through the HTTP API,
`whetstone train --wait` trains, evaluates and promotes, and the served model then knows
the facts on questions it never saw, without losing general knowledge. Also: the gate
refuses a candidate trained on corrupted data, and a killed run leaves no candidate.

These take minutes on two CPU cores, so they are marked slow (CI runs them).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

import data.store
from candidates import Registry
from common.config import load_settings
from data.splits import placement
from data.store import Store
from tests.conftest import ServerProcess, kill_training_processes, run_cli
from tests.scripted_person import FACTS, GENERAL

pytestmark = pytest.mark.slow

TRAIN_TIMEOUT = 1500


@pytest.fixture(autouse=True)
def _no_training_left_behind(home_for_training: Path):
    yield
    kill_training_processes(home_for_training)


def ask(url: str, question: str, max_tokens: int = 32) -> tuple[str, str]:
    """(message id, answer) for a one-turn question, greedy."""
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": max_tokens,
        },
        timeout=120,
    )
    resp.raise_for_status()
    body = resp.json()
    return body["id"], body["choices"][0]["message"]["content"]


def feedback(url: str, message_id: str, **fields: object) -> None:
    resp = httpx.post(f"{url}/v1/feedback", json={"message_id": message_id, **fields}, timeout=30)
    resp.raise_for_status()


def recall(url: str) -> tuple[int, list[str]]:
    answers = []
    for fact in FACTS:
        for probe in fact.probes:
            _, answer = ask(url, probe)
            answers.append((fact.keyword in answer.lower(), f"{probe} -> {answer}"))
    return sum(hit for hit, _ in answers), [line for _, line in answers]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)


def test_person_teaches_facts_and_the_promoted_model_knows_them(home_for_training: Path) -> None:
    server = ServerProcess(home_for_training).wait_ready()
    try:
        started = time.monotonic()
        for fact in FACTS:
            for question in fact.questions:
                # The person corrects whatever comes; the first words show it is wrong.
                message_id, _ = ask(server.url, question, max_tokens=8)
                feedback(server.url, message_id, rating=1, correction=fact.answer)
        for question, keyword in GENERAL:
            message_id, answer = ask(server.url, question)
            feedback(server.url, message_id, rating=5 if keyword in answer.lower() else 2)
        chatting_s = time.monotonic() - started
        base_hits, base_lines = recall(server.url)

        started = time.monotonic()
        result = run_cli(
            "train",
            "--home",
            str(home_for_training),
            "--profile",
            "quick_test",
            "--wait",
            timeout=TRAIN_TIMEOUT,
        )
        cycle_s = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert "promoted" in result.stdout, result.stdout

        # The CLI told the worker to reload; its status names the new adapter.
        status = httpx.get(f"{server.url}/v1/status", timeout=10).json()
        registry = Registry(home_for_training / "candidates")
        champion = registry.current_id()
        assert champion is not None
        assert json.dumps(status).count(champion) >= 1
        tuned_hits, tuned_lines = recall(server.url)
    finally:
        server.stop()

    meta = json.loads((registry.path(champion) / "meta.json").read_text())
    evaluation = meta["metrics"]["evaluation"]
    base, cand = evaluation["metrics"]["base"], evaluation["metrics"]["candidate"]
    drift = (cand["general_nll"] - base["general_nll"]) / base["general_nll"]
    total = sum(len(fact.probes) for fact in FACTS)
    summary = {
        "chatting_s": round(chatting_s, 1),
        "train_eval_report_s": round(cycle_s, 1),
        "recall_base": f"{base_hits}/{total}",
        "recall_promoted": f"{tuned_hits}/{total}",
        "general_nll_base": round(base["general_nll"], 4),
        "general_nll_promoted": round(cand["general_nll"], 4),
        "general_nll_drift": round(drift, 4),
        "general_facts": f"{cand['general_facts']}/{base['general_facts']}",
        "holdout_nll": [round(base["holdout_nll"], 4), round(cand["holdout_nll"], 4)],
        "stages": meta["metrics"]["training"]["stages"],
        "base_answers": base_lines,
        "promoted_answers": tuned_lines,
    }
    print(json.dumps(summary, indent=1))
    assert tuned_hits >= total * 3 // 4, summary
    assert tuned_hits > base_hits, summary
    assert drift <= load_settings(home_for_training).gate.max_general_nll_increase, summary

    page = (registry.path(champion) / "report.html").read_text()
    tags = _Tags()
    tags.feed(page)
    assert "img" in tags.tags and "script" not in tags.tags
    assert "PROMOTE" in page


# Questions of each fact the gate judges on; the rest train. The trainer places a message by a
# hash of its id (data.splits.placement); with random ids the held-out set changed from
# run to run, and a draw that held out most of one fact's questions and few of another's let a
# shuffled-target adapter through the gate (CI, once). Chosen ids make the split the same always.
HELD_OUT_QUESTIONS = (0, 6)


def _placed_id(where: tuple[float, float], counter: itertools.count) -> str:
    """The next message id whose placement falls in [low, high)."""
    while True:
        message_id = f"msg_{next(counter):016x}"
        if where[0] <= placement(message_id) < where[1]:
            return message_id


def _fill_store(home: Path, corrupt_training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripted person's feedback written straight to the store; with corrupt_training,
    every correction outside the holdout names another fact (targets shuffled)."""
    settings = load_settings(home)
    holdout = settings.training.holdout_fraction
    train_from = holdout + settings.training.validation_fraction
    counter = itertools.count()
    want: list[tuple[float, float]] = []
    real_new_id = data.store.new_id
    monkeypatch.setattr(
        data.store,
        "new_id",
        lambda prefix: _placed_id(want.pop(), counter) if want else real_new_id(prefix),
    )
    store = Store(settings.db_url)
    try:
        for index, fact in enumerate(FACTS):
            wrong = FACTS[(index + 1) % len(FACTS)].answer
            for number, question in enumerate(fact.questions):
                conversation = store.create_conversation()
                store.add_message(conversation.id, "user", question)
                held_out = number in HELD_OUT_QUESTIONS
                want.append((0.0, holdout) if held_out else (train_from, 1.0))
                answer = store.add_message(
                    conversation.id,
                    "assistant",
                    "I'm sorry, I don't have personal information about you.",
                    finish_reason="stop",
                )
                assert (placement(answer.id) < holdout) == held_out
                shuffled = corrupt_training and not held_out
                store.add_feedback(
                    answer.id, rating=1, correction=wrong if shuffled else fact.answer
                )
    finally:
        store.close()


def test_gate_refuses_a_candidate_trained_on_shuffled_corrections(
    home_for_training: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_store(home_for_training, corrupt_training=True, monkeypatch=monkeypatch)
    result = run_cli(
        "train",
        "--home",
        str(home_for_training),
        "--profile",
        "quick_test",
        "--wait",
        # The bad adapter is bad already after SFT: skip the preference stage to save time.
        "--set",
        "training.profiles.quick_test.preference_steps=0",
        timeout=TRAIN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gate: reject" in result.stdout, result.stdout
    registry = Registry(home_for_training / "candidates")
    assert registry.current_id() is None, "a rejected candidate must not be served"
    (candidate,) = [c for c in registry.list()]
    report = (candidate.path / "report.md").read_text()
    evaluation = candidate.meta.metrics["evaluation"]
    assert evaluation["decision"] == "reject"
    assert f"Deciding rule: `{evaluation['rule']}`" in report
    print(evaluation["rule"], evaluation["reason"])


def test_killed_training_leaves_no_candidate_and_is_marked_failed(
    home_for_training: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_store(home_for_training, corrupt_training=False, monkeypatch=monkeypatch)
    result = run_cli("train", "--home", str(home_for_training), "--profile", "quick_test")
    assert result.returncode == 0, result.stderr
    settings = load_settings(home_for_training)
    store = Store(settings.db_url)
    try:
        run = store.latest_run()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run = store.get_run(run.id)
            if run.progress.get("stage") == "sft" and run.progress.get("step", 0) >= 2:
                break
            assert run.status in ("queued", "running"), (run.status, run.error)
            time.sleep(0.5)
        else:
            pytest.fail(f"training never reached step 2: {run.progress}")
        os.kill(run.pid, signal.SIGKILL)
        time.sleep(1)
    finally:
        store.close()

    status = run_cli("status", "--home", str(home_for_training), "--json")
    assert status.returncode == 0, status.stderr
    last = json.loads(status.stdout)["last_run"]
    assert last["status"] == "failed"
    assert "killed or crashed" in last["error"]
    registry = Registry(home_for_training / "candidates")
    assert registry.list() == []
    assert registry.current_id() is None
    assert [p for p in (home_for_training / "candidates").iterdir() if p.is_dir()] == []

    # The lock died with the process: the next run is not refused as busy.
    again = run_cli(
        "train",
        "--home",
        str(home_for_training),
        "--wait",
        "--set",
        "schedule.min_new_examples=1000",
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped" in again.stdout and "min_new_examples" in again.stdout
