"""A correction the night's gate held out is learned the same night (training.catch_up): after a
promotion, the run's process redoes the run with the corrections its gate just judged, as a
run of its own (trigger "catch-up") that `whetstone train --wait` follows."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from candidates import Registry
from common.config import Settings, load_settings
from data import exports
from data.splits import split_items
from data.store import Store
from development.train import RunContext, catch_up_run
from development.training_data import released_corrections
from tests.conftest import run_cli
from tests.test_registry import BASE, make_meta, write_fake_adapter

# Six facts a newcomer teaches, one wrong answer each.
FACTS = (
    ("What is my cat's name?", "Your cat is called Pixel."),
    ("Which city do I live in?", "You live in Lyon."),
    ("What is my job?", "You work as a nurse."),
    ("Which sport do I play?", "You play tennis."),
    ("What is my sister's name?", "Your sister is called Ines."),
    ("What colour is my bike?", "Your bike is blue."),
)


def _teach_once(settings: Settings) -> list[str]:
    """Each fact asked once, its wrong answer rated 1 and then corrected (two requests, the
    TUI's order). Returns the answers' message ids."""
    ids = []
    with Store(settings.db_url) as store:
        for question, correction in FACTS:
            conversation = store.create_conversation(title=question)
            store.add_message(conversation.id, "user", question)
            reply = store.add_message(
                conversation.id, "assistant", "I don't know that.", finish_reason="stop"
            )
            store.add_feedback(reply.id, rating=1)
            store.add_feedback(reply.id, correction=correction)
            ids.append(reply.id)
    return ids


def _split(settings: Settings, store: Store):
    training = settings.training
    return split_items(
        exports.feedback_items(store), training.holdout_fraction, training.validation_fraction
    )


def test_a_catch_up_is_queued_only_for_corrections_the_gate_released(home: Path) -> None:
    settings = load_settings(home)
    settings.paths.create()
    _teach_once(settings)
    with Store(settings.db_url) as store:
        split = _split(settings, store)
        held_out = [item.message_id for item in split.holdout]
        assert held_out, "one correction in five is held out for the gate"
        # The champion was trained on the training split as it stood: its run's snapshot.
        snapshot = {
            "message_ids": {
                "train": [item.message_id for item in split.train],
                "validation": [item.message_id for item in split.validation],
                "holdout": held_out,
            },
            "feedback_high_water": max(i.created_at for i in split.train).isoformat(),
        }
        registry = Registry(settings.paths.candidates_dir)
        registry.create(make_meta("champion", data=snapshot), write_fake_adapter)
        registry.promote("champion", base_model=BASE)
        ctx = RunContext(settings, store, "run_first", "quick_test", "cpu", home / "scratch")

        # Before its gate judged the held-out correction, nothing is released.
        assert released_corrections(store, settings, snapshot) == 0
        assert catch_up_run(ctx) is None
        store.record_evaluation(
            "champion", decision="promote", rule="all_passed", judged_message_ids=held_out
        )
        assert released_corrections(store, settings, snapshot) == len(held_out)

        # A catch-up does not start another, and the setting turns it off.
        ctx.trigger = "catch-up"
        assert catch_up_run(ctx) is None
        ctx.trigger = "nightly"
        off = RunContext(
            load_settings(home, {"training": {"catch_up": False}}),
            store,
            "run_first",
            "quick_test",
            "cpu",
            home / "scratch",
        )
        assert catch_up_run(off) is None
        assert store.list_runs() == []

        follow = catch_up_run(ctx)
        assert follow is not None
        run = store.get_run(follow)
        # Running from the start (a queued run is one a dispatcher may start), in this process.
        assert (run.trigger, run.status, run.pid) == ("catch-up", "running", os.getpid())


@pytest.mark.slow
def test_a_newcomers_held_out_correction_is_trained_on_the_same_night(
    home_for_training: Path,
) -> None:
    settings = load_settings(home_for_training)
    taught = _teach_once(settings)
    # The defaults, except that six items are under schedule.min_new_examples.
    done = run_cli("train", "--home", str(home_for_training), "--wait", "--force", timeout=900)
    output = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    with Store(settings.db_url) as store:
        first, follow = sorted(store.list_runs(limit=5), key=lambda r: r.created_at)
        evaluations = store.list_evaluations(first.candidate_id, limit=1)
    held_out = first.data_snapshot["message_ids"]["holdout"]
    assert held_out and set(held_out) <= set(taught)
    assert evaluations[0].decision == "promote", output
    assert f"catch-up: {follow.id} trains on the corrections the gate just judged" in output

    # The catch-up redid the night's run, from where it started (a fresh adapter on a first
    # night), with what its gate held out now in training; the gate judged it too.
    assert (follow.trigger, follow.status) == ("catch-up", "succeeded"), follow.error
    trained = set(follow.data_snapshot["message_ids"]["train"])
    assert set(held_out) | set(first.data_snapshot["message_ids"]["train"]) <= trained
    meta = Registry(settings.paths.candidates_dir).get(follow.candidate_id).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"] == (
        f"it redoes the run of {first.candidate_id}, which started fresh"
    )
    assert f"{follow.id} trained candidate {follow.candidate_id}" in output
    assert output.count("gate: ") == 2

    # The first run's report asks each correction it trained on again, of it and the base.
    report = Registry(settings.paths.candidates_dir).path(first.candidate_id) / "report.md"
    said = re.search(
        r"the candidate says (\d+) of the (\d+) correction\(s\) taught since the base model.*"
        r"the base model says (\d+)\.",
        report.read_text(),
    )
    assert said, report.read_text()
    candidate_said, trained, base_said = map(int, said.groups())
    assert trained == len(taught) - len(held_out)
    assert candidate_said >= trained // 2 + 1 > base_said
