"""A night the gate refuses because the candidate's answers broke or it lost general knowledge
is trained again at once at a lower learning rate (training.retry_learning_rate_scale): the
gate's own advice for those refusals, taken by the night itself, so the day's facts do not
wait a day. Once: a retry is not retried, and a refusal on the person's held-out feedback, or
for want of a measurement, is not retried at all."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from candidates import Registry
from common.config import load_settings
from data.store import Store
from development.gate import Check, Gate, decide
from development.train import RunContext, follow_up, plan_stages, retry_run
from tests.conftest import run_cli
from tests.scripted_person import store_corrections
from tests.test_gate import base, candidate, champion


def _refused(rule: str, *, measured: bool = True) -> dict[str, Any]:
    """A verdict as evaluate_candidate returns it, refused by `rule`."""
    check = Check(rule, False, "a detail", measured=measured)
    return {"decision": "reject", "rule": rule, "checks": [check.__dict__]}


def test_a_refusal_for_broken_answers_or_general_loss_is_retried_at_half_the_rate(
    home: Path,
) -> None:
    settings = load_settings(home, {"training": {"retry_learning_rate_scale": 0.5}})
    settings.paths.create()
    with Store(settings.db_url) as store:
        ctx = RunContext(settings, store, "run_night", "quick_test", "cpu", home / "s")
        ctx.trigger = "nightly"
        for rule in ("holdout_win", "right_answers", "holdout_size"):
            ctx.verdict = _refused(rule)  # learned too little or the wrong thing
            assert retry_run(ctx) is None, rule
        ctx.verdict = _refused("general_regression", measured=False)  # nothing was scored
        assert retry_run(ctx) is None
        assert store.list_runs() == []

        ctx.verdict = _refused("sanity")
        follow = follow_up(ctx, promoted=False)
        assert follow is not None
        run = store.get_run(follow.run_id)
        assert (run.trigger, run.status, run.pid) == ("retry", "running", os.getpid())
        assert (follow.trigger, follow.learning_rate_scale) == ("retry", 0.5)
        # Once: the retry refused in turn is not retried again.
        follow.verdict = _refused("sanity")
        assert follow_up(follow, promoted=False) is None
        # A promoted retry is caught up at its own rate (nothing released here: no catch-up).
        assert follow_up(follow, promoted=True) is None

        off = load_settings(home)  # off by default (common/config.py says why)
        ctx_off = RunContext(off, store, "run_other", "quick_test", "cpu", home / "s")
        ctx_off.verdict = _refused("sanity")
        assert retry_run(ctx_off) is None
        assert len(store.list_runs()) == 1


def test_unscored_general_probes_are_a_refusal_not_measured() -> None:
    verdict = decide(
        candidate(general_nll=None), champion(), base(general_nll=None), Gate()
    ).as_dict()
    assert verdict["rule"] == "general_regression"
    assert verdict["checks"][3] == {
        "rule": "general_regression",
        "passed": False,
        "detail": "no general probes were scored",
        "measured": False,
    }
    measured = decide(candidate(general_nll=3.0), champion(), base(), Gate()).as_dict()
    assert measured["rule"] == "general_regression"
    assert measured["checks"][3]["measured"] is True


def test_a_retry_trains_every_stage_at_the_lower_rate(home: Path) -> None:
    settings = load_settings(home)
    counts = {"sft_rows": 10, "replay_rows": 5, "kto_desirable": 3, "kto_undesirable": 3}
    data = SimpleNamespace(sft=[{}] * 15, dpo=[{}] * 5, kto=[], counts=counts, kto_weights=(1, 1))
    first = plan_stages(data, settings, "standard")
    retried = plan_stages(data, settings, "standard", learning_rate_scale=0.5)
    assert [s.learning_rate for s in retried] == [s.learning_rate / 2 for s in first]
    assert [s.max_steps for s in retried] == [s.max_steps for s in first]
    assert "learning rate x0.5 (a retry of a refused run)" in retried[0].why


@pytest.mark.slow
def test_a_night_refused_for_general_loss_is_trained_again_at_half_the_rate(
    home_for_training: Path,
) -> None:
    # A run drilled without replay at a high rate, against a gate that allows no rise of the
    # general probes' NLL: refused for general loss (measured), then retried, then refused
    # again, and no third run.
    store_corrections(
        home_for_training,
        [("What is my cat's name?", "Your cat is called Pixel."), ("Where do I live?", "Lyon.")],
    )
    sets = [
        "training.retry_learning_rate_scale=0.5",
        "training.replay_fraction=0",
        "training.profiles.quick_test.max_steps=4",
        "training.profiles.quick_test.learning_rate=0.01",
        "gate.max_general_nll_increase=0",
    ]
    args = [a for item in sets for a in ("--set", item)]
    home = str(home_for_training)
    done = run_cli("train", "--home", home, "--wait", "--profile", "quick_test", *args, timeout=900)
    output = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    settings = load_settings(home_for_training)
    with Store(settings.db_url) as store:
        first, retry = sorted(store.list_runs(limit=5), key=lambda r: r.created_at)
        verdicts = [store.list_evaluations(r.candidate_id, limit=1)[0] for r in (first, retry)]
    assert [v.rule for v in verdicts] == ["general_regression", "general_regression"], output
    assert (retry.trigger, retry.status) == ("retry", "succeeded"), retry.error
    assert first.progress["next_run"] == retry.id
    assert f"retry: {retry.id} trains again at x0.5 the learning rate" in output
    assert output.count("gate: reject") == 2
    registry = Registry(settings.paths.candidates_dir)
    metas = [registry.get(r.candidate_id).meta for r in (first, retry)]
    rates = [m.metrics["training"]["stages"][0]["learning_rate"] for m in metas]
    assert rates == [0.01, 0.005]
    assert [m.config["learning_rate_scale"] for m in metas] == [1.0, 0.5]
    assert registry.current_id() is None  # nothing refused is served
