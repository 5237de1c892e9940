"""`whetstone train/eval/report` around the parts that need no model: a run with too little
data is recorded as skipped with the reason, and bad arguments get clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from data.store import Store
from tests.conftest import run_cli


def _feedback(home: Path, count: int, *, corrected: bool = True) -> None:
    store = Store(f"sqlite:///{home}/whetstone.db")
    try:
        for i in range(count):
            conversation = store.create_conversation()
            store.add_message(conversation.id, "user", f"question {i}?")
            answer = store.add_message(
                conversation.id, "assistant", f"answer {i}", finish_reason="stop"
            )
            if corrected:
                store.add_feedback(answer.id, rating=2, correction=f"better answer {i}")
            else:
                store.add_feedback(answer.id, rating=5)
    finally:
        store.close()


def test_train_with_too_little_feedback_is_skipped_with_the_reason(home: Path) -> None:
    # Liked answers only: a single correction is always worth a run (see sufficiency).
    _feedback(home, 3, corrected=False)
    result = run_cli("train", "--home", str(home), "--profile", "quick_test", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout
    said = " ".join(result.stdout.split())
    assert "min_new_examples" in said
    # What to do next: how much more to teach, or how to train anyway.
    assert "rate or correct about" in said and "whetstone train --force" in said

    status = json.loads(run_cli("status", "--home", str(home), "--json").stdout)
    run = status["last_run"]
    assert run["status"] == "skipped"
    assert "new feedback item(s)" in run["reason"]
    assert (home / "logs" / f"{run['id']}.log").is_file()
    assert not [p for p in (home / "candidates").iterdir() if not p.name.startswith(".")]


def test_train_without_any_feedback_says_there_is_nothing_to_learn(home: Path) -> None:
    result = run_cli("train", "--home", str(home), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no feedback to learn from" in result.stdout


def test_train_refuses_an_unknown_profile(home: Path) -> None:
    result = run_cli("train", "--home", str(home), "--profile", "huge")
    assert result.returncode == 1
    assert "unknown training profile 'huge'" in result.stderr
    assert "quick_test" in result.stderr


def test_eval_and_report_name_a_missing_candidate(home: Path) -> None:
    for command in ("eval", "report"):
        result = run_cli(command, "20991231-000000-abcdef", "--home", str(home))
        assert result.returncode == 1
        assert "20991231-000000-abcdef" in result.stderr


def test_eval_refuses_a_broken_adapter_folder_and_keeps_the_feedback(home: Path) -> None:
    from candidates import Registry
    from tests.test_registry import BASE, make_meta, write_fake_adapter

    _feedback(home, 2)
    registry = Registry(home / "candidates")
    candidate = registry.create(
        make_meta("20261121-030000-abcdef", base_model=BASE), write_fake_adapter
    )
    weights = candidate.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated, as by a full disk

    result = run_cli("eval", candidate.id, "--home", str(home))
    assert result.returncode == 1
    assert "adapter_model.safetensors" in result.stderr
    store = Store(f"sqlite:///{home}/whetstone.db")
    try:
        assert store.counts()["feedback"] == 2
        assert store.list_evaluations(candidate.id) == []
    finally:
        store.close()


def test_train_names_a_bad_config_value(home: Path) -> None:
    result = run_cli("train", "--home", str(home), "--set", "training.validation_fraction=0.95")
    assert result.returncode != 0
    assert "training.validation_fraction" in result.stderr


def test_with_a_daemon_one_training_run_waits_at_most(home: Path) -> None:
    """While the daemon holds the home, a training request queues a run; the second one
    (a double press, a page posting in a loop) is refused naming the queued run, not queued
    again (ten runs in a second used to wait in line)."""
    import fcntl
    import os

    import pytest

    from common.config import load_settings
    from common.run_state import LOCK_NAME
    from orchestrator.jobs import JobBusy, request_training

    settings = load_settings(home)
    settings.paths.create()
    lock = settings.paths.run_dir / LOCK_NAME
    lock.write_text(str(os.getpid()))
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # what the running daemon holds
    try:
        with Store(settings.db_url) as store:
            first = request_training(settings, store, "quick_test")
            assert first.queued_with_daemon and first.process is None
            with pytest.raises(JobBusy, match=f"run {first.run_id} \\(quick_test\\) is already"):
                request_training(settings, store, "standard")
            assert [r.id for r in store.list_runs(limit=10, status="queued")] == [first.run_id]
        refused = run_cli("train", "--home", str(home), "--profile", "quick_test")
        assert refused.returncode != 0
        assert f"run {first.run_id} (quick_test) is already queued" in refused.stderr
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        os.close(held)
