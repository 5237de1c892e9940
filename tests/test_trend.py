"""`whetstone trend`: the model over weeks, from the store (no model needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from data.store import Store
from data.trend import text, trend
from tests.conftest import run_cli


def _history(home: Path) -> datetime:
    """Three days: the base model answers twice (one rated 2, one corrected); a promotion;
    the adapter answers three times (rated 5 and 4, one regenerated), in a second
    conversation. Each answer 11 tokens: first token after 200-600 ms, 10 more in 0.5 s on
    the base model and 0.25 s on the adapter. Returns 'now'."""
    home.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{home / 'whetstone.db'}")
    now = datetime.now(UTC)
    day1, day3 = now - timedelta(days=2), now - timedelta(minutes=5)
    conversation = store.create_conversation()
    ttfts = iter([200.0, 600.0, 300.0, 300.0, 500.0])

    def answer(when: datetime, adapter: str | None, reply_to: str | None = None) -> str:
        if reply_to is None:
            reply_to = store.add_message(conversation.id, "user", "q", created_at=when).id
        ttft = next(ttfts)
        context = 20 * len(store.get_conversation(conversation.id).messages)
        return store.add_message(
            conversation.id, "assistant", "a", reply_to_id=reply_to, adapter_id=adapter,
            finish_reason="stop", created_at=when, ttft_ms=ttft, completion_tokens=11,
            prompt_tokens=context, latency_ms=ttft + (500 if adapter is None else 250),
        ).id  # fmt: skip

    first = answer(day1, None)
    store.add_feedback(first, rating=2)
    store.add_feedback(answer(day1, None), correction="better")
    store.record_evaluation(
        "cand-a",
        decision="promote",
        rule="wins",
        metrics={"candidate": {"holdout_nll": 1.25, "general_facts": 21}},
    )
    store.record_promotion("promote", "cand-a", None)
    conversation = store.create_conversation()
    liked = answer(day3, "cand-a")
    store.add_feedback(liked, rating=5)
    store.add_feedback(answer(day3, "cand-a"), rating=4)
    asked = store.get_conversation(conversation.id).messages[-2].id
    answer(day3, "cand-a", reply_to=asked)  # a regeneration of the last turn
    store.close()
    return now


def test_trend_counts_days_adapters_promotions_and_scores(tmp_path: Path) -> None:
    home = tmp_path / "home"
    now = _history(home)
    store = Store(f"sqlite:///{home / 'whetstone.db'}")
    try:
        found = trend(store, weeks=1, now=now + timedelta(seconds=1))
    finally:
        store.close()
    rows = [row.as_dict() for row in found.days]
    assert [(r["adapter_id"], r["answers"]) for r in rows] == [(None, 2), ("cand-a", 3)]
    assert rows[0]["mean_rating"] == 2.0 and rows[0]["corrected_share"] == 0.5
    assert rows[1]["mean_rating"] == 4.5 and rows[1]["regenerations"] == 1
    # Response time: the median first token, and the tokens after it over their time.
    assert (rows[0]["median_ttft_s"], rows[0]["tokens_per_s"]) == (0.4, 20.0)
    assert (rows[1]["median_ttft_s"], rows[1]["tokens_per_s"]) == (0.3, 40.0)
    # Conversation length, by the day each started: turns answered, the longest context.
    started = [(c.day, c.as_dict()["turns_per_conversation"]) for c in found.conversations]
    assert started == [
        ((now - timedelta(days=2)).date(), 2.0),
        ((now - timedelta(minutes=5)).date(), 2.0),
    ]
    # The base's conversation reached 60 + 11 tokens; the adapter's regeneration 80 + 11.
    assert [c.as_dict()["tokens_per_conversation"] for c in found.conversations] == [71.0, 91.0]
    assert [e["action"] for e in found.events] == ["promote"]
    assert found.champions[0]["holdout_nll"] == 1.25
    assert found.champions[0]["general_facts"] == 21
    table = text(found)
    assert "base model" in table and "cand-a" in table and "promoted -> cand-a" in table
    old = trend(Store(f"sqlite:///{home / 'whetstone.db'}"), weeks=1, now=now - timedelta(weeks=2))
    assert old.days == [] and "(no answers in this period)" in text(old)


def test_trend_cli_text_json_and_html_page(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _history(home)
    shown = run_cli("trend", "--home", str(home), "--weeks", "2")
    assert shown.returncode == 0, shown.stderr
    assert "cand-a" in shown.stdout and "50%" in shown.stdout
    as_json = run_cli("trend", "--home", str(home), "--json")
    assert json.loads(as_json.stdout)["days"][1]["adapter_id"] == "cand-a"
    page = run_cli("trend", "--home", str(home), "--html")
    assert page.returncode == 0, page.stderr
    written = Path(page.stdout.strip())
    assert written.parent == home / "reports" and written.is_file()
    content = written.read_text()
    assert content.count("data:image/png;base64,") == 3  # per day, use, the champions
    assert "1st tok" in shown.stdout and "0.40 s" in shown.stdout
    assert "promoted -&gt; cand-a" in content
    assert run_cli("trend", "--home", str(home), "--weeks", "0").returncode == 2


def test_the_weekly_report_job_writes_the_page(tmp_path: Path) -> None:
    from orchestrator import schedule

    home = tmp_path / "home"
    _history(home)
    schedule.weekly_report(str(home))
    assert len(list((home / "reports").glob("trend-*.html"))) == 1
