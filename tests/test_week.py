"""Two days of the simulated week (benchmarks.week) on the real daemon and the embedded model:
the person's facts are learned and kept, general knowledge is kept, and a night's cycle does
not grow with the history. The full week runs on a developer machine (its JSON is committed
under benchmarks/results/); this is its reduced form, with assertions on the curves' direction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import week_person
from benchmarks.week import run_week

pytestmark = pytest.mark.slow


def test_two_days_with_the_daemon_teach_facts_that_stay_and_keep_general_knowledge(
    tmp_path: Path, base_answers_dir: Path
) -> None:
    result = run_week(
        tmp_path / "home",
        days=2,
        seed=1,
        facts_per_day=(2, 1),
        chats_per_day=4,
        taste_prompts=week_person.TASTE_PROMPTS[:4],
        # Two days of feedback put 2-7 items in the holdout (placed by a hash of random
        # ids); the default of 4 would make the first promotion a coin flip.
        sets=["gate.min_holdout_items=2"],
    )
    base, first, second = result["timeline"]
    summary = result["summary"]

    # Each night the configured nightly trigger trained, evaluated and decided.
    assert [day["run"]["trigger"] for day in (first, second)] == ["nightly", "nightly"]
    assert [day["run"]["status"] for day in (first, second)] == ["succeeded", "succeeded"]
    assert second["run"]["rows"]["sft_rows"] > first["run"]["rows"]["sft_rows"]

    # The base knows none of the person's facts; after two nights the promoted adapter
    # serves and recalls them on questions never trained on, day 1's facts included.
    assert base["recall"]["hits"] == 0
    assert summary["promotions"] >= 1 and second["adapter"] is not None, summary
    assert second["recall"]["share"] >= 0.75, summary
    day_one = summary["recall_first_day_facts_last_day"]
    assert sum(int(hits.split("/")[0]) for hits in day_one.values()) >= 3, summary

    # General knowledge kept; the second night's cycle no slower than twice the first's.
    assert summary["knowledge_lost"] <= 1, summary
    assert summary["last_over_first_cycle"] <= 2.0, summary
