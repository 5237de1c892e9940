"""After a promotion the person's ratings judge the new adapter: clearly worse than what it
replaced rolls it back (with the reason in its report); as good, or too few ratings, keeps it.
Real SQLite store and registry."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from candidates import Registry
from common.config import Settings, load_settings
from data.models import utcnow
from data.store import Store
from orchestrator import promotion, watch
from tests.test_registry import make_meta, write_fake_adapter


@pytest.fixture
def setup(home: Path) -> tuple[Settings, Store, Registry]:
    (home / "config.toml").write_text("[watch]\nratings = 4\nmargin = 0.5\n")
    settings = load_settings(home)
    store = Store(settings.db_url)
    yield settings, store, Registry(settings.paths.candidates_dir)
    store.close()


def add(registry: Registry, candidate_id: str) -> str:
    meta = make_meta(candidate_id, base_model="embedded:smollm2-135m-instruct")
    registry.create(meta, write_fake_adapter)
    return candidate_id


def rate(
    store: Store,
    adapter: str | None,
    ratings: list[int],
    *,
    ago_s: float = 0,
    correction: str | None = None,
) -> None:
    for rating in ratings:
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", "Hi?")
        answer = store.add_message(
            conversation.id,
            "assistant",
            "Hello.",
            finish_reason="stop",
            adapter_id=adapter,
            created_at=utcnow() - timedelta(seconds=ago_s),
        )
        store.add_feedback(answer.id, rating=rating, correction=correction)


def promote(settings: Settings, store: Store, registry: Registry, candidate: str) -> None:
    promotion.promote(settings, store, registry, candidate, force=True, actor="test")


def test_rated_clearly_worse_rolls_back_and_says_why(setup) -> None:
    settings, store, registry = setup
    old, new = add(registry, "old"), add(registry, "new")
    (registry.path(new) / "report.md").write_text("# Report\n")
    (registry.path(new) / "report.html").write_text("<html><body><h1>Report</h1></body></html>")
    promote(settings, store, registry, old)
    rate(store, old, [5, 4, 5, 4], ago_s=0)
    promote(settings, store, registry, new)
    rate(store, new, [2, 3, 2])
    assert watch.check(settings, store, registry) is None  # 3 of 4 ratings: not yet
    rate(store, new, [3])
    reason = watch.check(settings, store, registry)
    assert reason is not None and "2.50" in reason and "4.50" in reason
    assert registry.current_id() == old
    latest = store.list_promotions(limit=1)[0]
    assert (latest.action, latest.actor, latest.candidate_id) == ("auto_rollback", "watch", old)
    recorded = registry.get(new).meta.metrics["rollbacks"]  # meta.json has what happened
    assert [(r["reason"], r["now_serving"]) for r in recorded] == [(reason, old)]
    md = (registry.path(new) / "report.md").read_text()
    assert "Rolled back after promotion" in md
    assert md.startswith("# Evaluation report: new")  # rendered again from meta.json
    page = (registry.path(new) / "report.html").read_text()
    assert page.index("Rolled back") < page.index("</body>")
    assert watch.check(settings, store, registry) is None  # decided once


def test_as_good_or_too_little_to_compare_keeps_it(setup) -> None:
    settings, store, registry = setup
    first, second = add(registry, "first"), add(registry, "second")
    promote(settings, store, registry, first)
    rate(store, first, [1, 2, 1, 2])  # the base answered nothing rated: nothing to compare
    assert watch.check(settings, store, registry) is None
    assert registry.current_id() == first
    promote(settings, store, registry, second)
    rate(store, second, [2, 1, 2, 1])  # as poor as `first` was: within the margin
    assert watch.check(settings, store, registry) is None
    assert registry.current_id() == second


def test_a_bad_first_promotion_rolls_back_to_the_base_model(setup) -> None:
    settings, store, registry = setup
    rate(store, None, [4, 4, 5, 4])
    only = add(registry, "only")
    promote(settings, store, registry, only)
    rate(store, only, [1, 1, 2, 1])
    assert watch.check(settings, store, registry)
    assert registry.current_id() is None and registry.previous_id() == only


def test_teaching_the_morning_after_a_promotion_is_not_a_verdict_on_it(setup) -> None:
    settings, store, registry = setup
    rate(store, None, [3, 4, 3, 4])
    new = add(registry, "new")
    promote(settings, store, registry, new)
    # The person teaches new facts: every answer rated 1 and corrected. No adapter knew.
    rate(store, new, [1, 1, 1, 1, 1], correction="My sister is called Marta.")
    assert watch.check(settings, store, registry) is None
    rate(store, new, [4, 3, 3])
    assert watch.check(settings, store, registry) is None  # 3 real ratings: not yet
    rate(store, new, [3])  # 3.25 against 3.5: within the margin, however many 1s taught
    assert watch.check(settings, store, registry) is None
    assert registry.current_id() == new
