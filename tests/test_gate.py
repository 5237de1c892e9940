"""The gate: which candidate may replace the champion, and why, from metrics alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import Gate, load_settings
from development.gate import decide

RULES = [
    "holdout_size",
    "holdout_win",
    "right_answers",
    "general_regression",
    "general_facts",
    "sanity",
]


def candidate(**changes: Any) -> dict[str, Any]:
    """A candidate that passes every default rule against champion() and base()."""
    metrics = {
        "holdout_items": 10,
        "holdout_nll": 1.50,  # 25% better than the champion
        "correction_accuracy": 0.9,
        "correction_contrasts": 10,
        "preference_accuracy": 0.8,
        "general_nll": 2.02,  # +1% over the base
        "general_facts": 5,
        "general_facts_total": 5,
        "sanity_checked": 6,
        "sanity_failures": [],
    }
    return {**metrics, **changes}


def champion(**changes: Any) -> dict[str, Any]:
    metrics = {
        "holdout_items": 10,
        "holdout_nll": 2.00,
        "correction_accuracy": 0.3,
        "correction_contrasts": 10,
        "preference_accuracy": 0.7,
        "general_nll": 2.00,
        "general_facts": 5,
        "general_facts_total": 5,
        "sanity_checked": 6,
        "sanity_failures": [],
    }
    return {**metrics, **changes}


def base(**changes: Any) -> dict[str, Any]:
    return champion(**changes)


def check(verdict, rule: str):
    return next(c for c in verdict.checks if c.rule == rule)


@pytest.fixture
def gate(home: Path) -> Gate:
    return load_settings(home, gpu_count=0).gate


def test_the_right_style_with_the_wrong_answers_is_refused(gate: Gate) -> None:
    # A shuffled-target adapter: its held-out NLL looks like a big win (it learned how the
    # person's answers read), but it prefers other questions' answers.
    champ = champion(correction_accuracy=0.9)
    verdict = decide(candidate(holdout_nll=0.4, correction_accuracy=0.1), champ, base(), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "right_answers")
    assert (
        "10 held-out corrections preferred over the person's other corrections in 10% of pairs"
        in verdict.reason
    )
    # A small slip below a champion that was already right on everything is tolerated.
    slip = decide(
        candidate(correction_accuracy=0.8), champion(correction_accuracy=1.0), base(), gate
    )
    assert slip.decision == "promote"
    # Without two distinct held-out corrections there is nothing to contrast: no check.
    alone = decide(candidate(correction_accuracy=None), champion(), base(), gate)
    assert alone.decision == "promote"
    assert "right_answers" not in [c.rule for c in alone.checks]


def test_all_good_promotes(gate: Gate) -> None:
    verdict = decide(candidate(), champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("promote", "all_passed")
    assert [c.rule for c in verdict.checks] == RULES
    assert all(c.passed for c in verdict.checks)


def test_config_gate_is_the_default_gate(gate: Gate) -> None:
    assert gate == Gate()


def test_too_few_holdout_items_refused_when_configured(gate: Gate) -> None:
    refuse = gate.model_copy(update={"few_held_out": "refuse"})
    verdict = decide(candidate(holdout_items=3), champion(), base(), refuse)
    assert (verdict.decision, verdict.rule) == ("reject", "holdout_size")
    assert "3 held-out" in verdict.reason and "gate.min_holdout_items" in verdict.reason
    assert decide(candidate(holdout_items=4), champion(), base(), refuse).decision == "promote"
    missing = candidate()
    del missing["holdout_items"]
    assert decide(missing, champion(), base(), refuse).rule == "holdout_size"


def test_too_few_holdout_items_judged_on_no_regression(gate: Gate) -> None:
    """A newcomer's first night: 2 held-out items can show neither a win nor a loss; a
    candidate that regresses nothing general is promoted, and the report says why."""
    # 6% worse on two items (a liked answer the base wrote itself): reported, not judged.
    verdict = decide(candidate(holdout_items=2, holdout_nll=2.12), champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("promote", "all_passed")
    detail = check(verdict, "holdout_size").detail
    assert "promoted if nothing regresses (gate.few_held_out)" in detail
    assert (
        "+6.0%); too few items to judge by, reported only" in check(verdict, "holdout_win").detail
    )
    # Nothing held out yet: the general rules alone decide.
    none = candidate(holdout_items=0, holdout_nll=None)
    assert decide(none, champion(holdout_nll=None), base(), gate).decision == "promote"
    # ... and still refuse a candidate that lost general knowledge, or broke its answers.
    drifted = candidate(holdout_items=2, general_nll=2.5)
    verdict = decide(drifted, champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "general_regression")
    broken = candidate(holdout_items=1, sanity_failures=["empty answer"])
    assert decide(broken, champion(), base(), gate).rule == "sanity"


def test_small_win_is_not_enough(gate: Gate) -> None:
    verdict = decide(candidate(holdout_nll=1.98), champion(holdout_nll=2.0), base(), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "holdout_win")
    assert "1.0% better, 2.0% needed" in verdict.reason
    assert "gate.min_win_margin" in verdict.reason
    # A worse candidate is rejected on the same rule.
    worse = decide(candidate(holdout_nll=2.2), champion(holdout_nll=2.0), base(), gate)
    assert worse.rule == "holdout_win"
    # With no margin configured a 1% win is enough.
    lenient = Gate(min_win_margin=0)
    assert decide(candidate(holdout_nll=1.98), champion(), base(), lenient).decision == "promote"


def test_better_nll_but_worse_preference_accuracy(gate: Gate) -> None:
    verdict = decide(
        candidate(preference_accuracy=0.6), champion(preference_accuracy=0.7), base(), gate
    )
    assert (verdict.decision, verdict.rule) == ("reject", "holdout_win")
    assert "25.0% better" in verdict.reason
    assert "preference accuracy fell to 60% from the champion's 70%" in verdict.reason
    # Equal accuracy, or none measured, does not block.
    same = candidate(preference_accuracy=0.7)
    assert decide(same, champion(preference_accuracy=0.7), base(), gate).decision == "promote"
    unmeasured = candidate(preference_accuracy=None)
    assert decide(unmeasured, champion(), base(), gate).decision == "promote"


def test_missing_holdout_nll_cannot_win(gate: Gate) -> None:
    verdict = decide(candidate(holdout_nll=None), champion(), base(), gate)
    assert verdict.rule == "holdout_win"
    assert "no held-out targets" in verdict.reason


def test_general_regression(gate: Gate) -> None:
    verdict = decide(candidate(general_nll=2.2), champion(), base(general_nll=2.0), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "general_regression")
    assert "+10.0%" in verdict.reason and "bound +5.0%" in verdict.reason
    within = decide(candidate(general_nll=2.08), champion(), base(general_nll=2.0), gate)
    assert within.decision == "promote"
    unscored = decide(candidate(general_nll=None), champion(), base(), gate)
    assert unscored.rule == "general_regression"


def test_lost_general_fact(gate: Gate) -> None:
    strict = Gate(max_general_facts_lost=0)
    verdict = decide(candidate(general_facts=4), champion(), base(general_facts=5), strict)
    assert (verdict.decision, verdict.rule) == ("reject", "general_facts")
    assert "4/5" in verdict.reason and "5/5" in verdict.reason
    # The default tolerates two flipped probes, not three.
    assert decide(candidate(general_facts=3), champion(), base(), gate).decision == "promote"
    three = decide(candidate(general_facts=2), champion(), base(general_facts=5), gate)
    assert three.rule == "general_facts"
    # Knowing more than the base is fine.
    assert decide(candidate(), champion(), base(general_facts=4), gate).decision == "promote"


def test_sanity_failure_is_named(gate: Gate) -> None:
    failures = ["answer 3 repeats 'the the the'"]
    verdict = decide(candidate(sanity_failures=failures), champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "sanity")
    assert "5/6 generated answers passed" in verdict.reason
    assert "answer 3 repeats 'the the the'" in verdict.reason
    # Nothing generated is not a pass.
    unchecked = decide(candidate(sanity_checked=0), champion(), base(), gate)
    assert unchecked.rule == "sanity"


def test_no_more_unfinished_answers_than_the_reference_is_not_a_sanity_failure(
    gate: Gate,
) -> None:
    long = "'Why do leaves change colour in autumn?': did not finish within 192 tokens"
    hobby = "'Give me an idea for a weekend hobby.': did not finish within 192 tokens"
    loop = "'What is a prime number?': repeats 'the the the'"
    # No adapter current: the base's metrics stand for the champion's (evaluate passes the
    # same dict). The base ran long on one prompt, the candidate on another: one each, as a
    # week's first night on seed 1 did; that is not a defect the candidate brought.
    first_base = base(sanity_failures=[long])
    verdict = decide(candidate(sanity_failures=[hobby]), first_base, first_base, gate)
    assert (verdict.decision, verdict.rule) == ("promote", "all_passed")
    assert (
        "6/6 generated answers passed (1 unfinished excused: the base's answers ran long 1 "
        "time(s); fewer than half may)" in check(verdict, "sanity").detail
    )
    # With a champion current, the base's answers are not generated: the champion's are the
    # reference.
    unread_base = base(sanity_checked=0, sanity_failures=[])
    verdict = decide(
        candidate(sanity_failures=[hobby]), champion(sanity_failures=[long]), unread_base, gate
    )
    assert verdict.decision == "promote"
    assert "excused: the champion's answers ran long 1 time(s)" in check(verdict, "sanity").detail
    # One long answer of three is excused even where the reference ran long on none: a
    # prompt that invites an essay. Half of them or more is an adapter that lost the end of
    # an answer; a loop (or any other defect) is refused outright.
    three = candidate(sanity_checked=3, sanity_failures=[hobby])
    assert decide(three, champion(), base(), gate).decision == "promote"
    two_of_three = candidate(sanity_checked=3, sanity_failures=[hobby, long])
    assert decide(two_of_three, champion(), base(), gate).rule == "sanity"
    more = [f"'q{i}': did not finish within 192 tokens" for i in range(3)]
    for failures in ([long, *more], [loop], [hobby, loop]):
        verdict = decide(
            candidate(sanity_failures=failures), champion(sanity_failures=[long]), base(), gate
        )
        assert (verdict.decision, verdict.rule) == ("reject", "sanity"), failures


def test_an_answer_that_broke_where_the_champions_broke_too_is_not_the_candidates_defect(
    gate: Gate,
) -> None:
    loop = "'What team am I a fan of?': repeats 'of the team of' 62 times"
    stress = "'Give me three ways to reduce stress.': repeats '*1. *1. *1. *1.' 59 times"
    champion_loop = "'What team am I a fan of?': repeats 'the team' 40 times"
    unread_base = base(sanity_checked=0, sanity_failures=[])
    # The champion's answer to the same question looped too: excused, and said so.
    verdict = decide(
        candidate(sanity_failures=[loop]),
        champion(sanity_failures=[champion_loop]),
        unread_base,
        gate,
    )
    assert (verdict.decision, verdict.rule) == ("promote", "all_passed")
    assert (
        "6/6 generated answers passed (1 excused: the champion's answers to them broke too)"
        in check(verdict, "sanity").detail
    )
    # A loop where the champion answered cleanly is the candidate's own.
    verdict = decide(
        candidate(sanity_failures=[loop, stress]),
        champion(sanity_failures=[champion_loop]),
        unread_base,
        gate,
    )
    assert (verdict.decision, verdict.rule) == ("reject", "sanity")
    assert "reduce stress" in verdict.reason and "team" not in verdict.reason
    # A prompt's answer that broke is matched by the prompt, not the kind of failure; a
    # prompt quoted with double quotes (it holds an apostrophe) too.
    apostrophe = '"What\'s my cat called?": empty answer'
    verdict = decide(
        candidate(sanity_failures=[apostrophe]),
        champion(sanity_failures=['"What\'s my cat called?": did not finish within 192 tokens']),
        unread_base,
        gate,
    )
    assert verdict.decision == "promote"


def test_sanity_not_required() -> None:
    gate = Gate(require_sanity=False)
    metrics = candidate(sanity_checked=0, sanity_failures=["empty answer"])
    verdict = decide(metrics, champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("promote", "all_passed")
    assert "sanity" not in [c.rule for c in verdict.checks]


def test_first_failing_rule_decides_and_every_check_is_listed(gate: Gate) -> None:
    bad = candidate(
        holdout_nll=1.99,
        correction_accuracy=0.0,
        general_nll=3.0,
        general_facts=2,
        sanity_failures=["empty answer"],
    )
    verdict = decide(bad, champion(), base(), gate)
    assert (verdict.decision, verdict.rule) == ("reject", "holdout_win")
    assert [c.rule for c in verdict.checks] == RULES
    assert [c.passed for c in verdict.checks] == [True, False, False, False, False, False]
    assert verdict.reason == check(verdict, "holdout_win").detail

    later = decide(candidate(general_facts=2, sanity_failures=["x"]), champion(), base(), gate)
    assert later.rule == "general_facts"
    assert [c.passed for c in later.checks] == [True, True, True, True, False, False]

    refuse = gate.model_copy(update={"few_held_out": "refuse"})
    everything = decide({**bad, "holdout_items": 0}, champion(), base(), refuse)
    assert everything.rule == "holdout_size"
    assert not any(c.passed for c in everything.checks)


def test_verdict_as_dict_is_json(gate: Gate) -> None:
    for metrics in (candidate(), candidate(holdout_items=1, sanity_failures=["bad"])):
        verdict = decide(metrics, champion(), base(), gate)
        data = json.loads(json.dumps(verdict.as_dict()))
        assert data["decision"] == verdict.decision
        assert data["rule"] == verdict.rule
        assert data["reason"] == verdict.reason
        assert [c["rule"] for c in data["checks"]] == RULES
        assert set(data["checks"][0]) == {"rule", "passed", "detail", "measured"}


def test_a_refusal_says_what_to_do_next(gate: Gate) -> None:
    from development.gate import next_step

    drifted = decide(candidate(general_nll=3.0), champion(), base(), gate)
    step = next_step(drifted.rule, "cand-1")
    assert step is not None and "training.replay_fraction" in step and "cand-1" in step
    lost = decide(candidate(holdout_nll=1.99), champion(), base(), gate)
    assert "whetstone promote cand-1 --force" in next_step(lost.rule, "cand-1")
    assert next_step("all_passed", "cand-1") is None
