"""The loop on the real embedded model, through `whetstone train --wait`: the gate refuses a
candidate trained on corrupted data, and a killed run leaves no candidate. (A person teaching
facts that the promoted model then knows, through the HTTP API and the daemon's nightly run,
is tests/test_week.py.)

These take minutes on two CPU cores, so they are marked slow (CI runs them).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from candidates import Registry
from common.config import load_settings
from data.models import TrainingRun
from data.store import Store
from tests.conftest import kill_training_processes, run_cli
from tests.scripted_person import FACTS
from tests.test_training_data import place

pytestmark = pytest.mark.slow

TRAIN_TIMEOUT = 1500


@pytest.fixture(autouse=True)
def _no_training_left_behind(home_for_training: Path):
    yield
    kill_training_processes(home_for_training)


# Questions of each fact the gate judges on; the rest train. A held-out set that held out
# most of one fact's questions and few of another's let a shuffled-target adapter through the
# gate (CI, once, when placements were a hash of random ids); writing each answer's stored
# placement before its feedback makes the split the same always.
HELD_OUT_QUESTIONS = (0, 6)
# And questions of each fact held out for early stopping, as the default split holds out some
# of every person's feedback: a run with none follows the general prompts' loss alone, and
# its best checkpoint was the least trained one (step 8 of 24), an adapter too weak to show
# the shuffle (it passed right_answers, 83% against 96%, on a fresh install of the pins).
VALIDATION_QUESTIONS = (3, 9)


def _fill_store(home: Path, corrupt_training: bool) -> None:
    """The scripted person's feedback written straight to the store; with corrupt_training,
    every correction outside the holdout (validation included) names another fact."""
    settings = load_settings(home)
    store = Store(settings.db_url)
    try:
        for index, fact in enumerate(FACTS):
            wrong = FACTS[(index + 1) % len(FACTS)].answer
            for number, question in enumerate(fact.questions):
                conversation = store.create_conversation()
                store.add_message(conversation.id, "user", question)
                held_out = number in HELD_OUT_QUESTIONS
                answer = store.add_message(
                    conversation.id,
                    "assistant",
                    "I'm sorry, I don't have personal information about you.",
                    finish_reason="stop",
                )
                validation = number in VALIDATION_QUESTIONS
                split = "holdout" if held_out else "validation" if validation else "train"
                place(store, answer.id, split, settings)
                shuffled = corrupt_training and not held_out
                store.add_feedback(
                    answer.id, rating=1, correction=wrong if shuffled else fact.answer
                )
    finally:
        store.close()


def test_gate_refuses_a_candidate_trained_on_shuffled_corrections(
    home_for_training: Path,
) -> None:
    _fill_store(home_for_training, corrupt_training=True)
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
        # Learned through: a fully shuffled adapter wins 2 of 3 pairs (67%) on right_answers,
        # the base 96%; at 40 steps it won 75%, one pair inside the gate's 20% drop.
        "--set",
        "training.profiles.quick_test.max_steps=60",
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


def _kill_in_training(home: Path, *, after_steps: int) -> TrainingRun:
    """`whetstone train` (quick_test), its process killed -9 once SFT has run `after_steps`
    steps; the run as it was then. Without the model's paraphrases of the corrected questions
    (training.correction_variants): writing them for 32 questions took longer than the steps
    waited for, and what the run would have trained on is not what this is about."""
    started = run_cli(
        "train",
        "--home",
        str(home),
        "--profile",
        "quick_test",
        "--set",
        "training.correction_variants=0",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    with Store(load_settings(home).db_url) as store:
        run = store.latest_run()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run = store.get_run(run.id)
            progress = run.progress
            if (
                run.status == "running"
                and progress.get("stage") == "sft"
                and progress.get("step", 0) >= after_steps
            ):
                break
            assert run.status in ("queued", "running"), (run.status, run.error)
            time.sleep(0.5)
        else:
            pytest.fail(f"training never reached step {after_steps}: {run.progress}")
        os.kill(run.pid, signal.SIGKILL)
    return run


def test_killed_training_leaves_no_candidate_and_is_marked_failed(
    home_for_training: Path,
) -> None:
    _fill_store(home_for_training, corrupt_training=False)
    run = _kill_in_training(home_for_training, after_steps=2)
    time.sleep(1)

    status = run_cli("status", "--home", str(home_for_training), "--json")
    assert status.returncode == 0, status.stderr
    last = json.loads(status.stdout)["last_run"]
    assert last["status"] == "failed"
    assert "killed or crashed" in last["error"]
    registry = Registry(home_for_training / "candidates")
    assert registry.list() == []
    assert registry.current_id() is None
    assert [p for p in (home_for_training / "candidates").iterdir() if p.is_dir()] == []

    # The lock died with the process: the next run is not refused as busy. It takes the
    # lock and starts training (then it is killed too: its outcome is not the point).
    second = _kill_in_training(home_for_training, after_steps=0)
    assert second.id != run.id
