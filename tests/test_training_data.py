"""Training data of one run: the rolling holdout, stable splits, replay, fitting, sufficiency.

Everything runs on a real SQLite store with feedback created through the Store API; token
counts come from a word counter (no tokenizer, no model).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from common.config import Settings, load_settings
from data.exports import FeedbackItem, feedback_items
from data.models import Message
from data.splits import PLACEMENT_KINDS, Split, placement_kind, split_items, spread_placement
from data.store import Store
from development import training_data
from development.training_data import build, fit_prompt, kto_weights, sft_target


def count_words(prompt: list[dict[str, str]], answer: str) -> int:
    """A fake token counter: one token per whitespace-separated word."""
    return sum(len(turn["content"].split()) for turn in prompt) + len(answer.split())


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def make_settings(home: Path, **sections: dict[str, Any]) -> Settings:
    return load_settings(home, sections, gpu_count=0)


def placed_in(split: str, settings: Settings) -> float:
    """A placement number inside `split` under these settings (the middle of its range)."""
    holdout = settings.training.holdout_fraction
    validation_end = holdout + settings.training.validation_fraction
    return {
        "holdout": holdout / 2,
        "validation": (holdout + validation_end) / 2,
        "train": (validation_end + 1) / 2,
    }[split]


def place(store: Store, message_id: str, split: str, settings: Settings) -> None:
    """Write an answer's stored placement into `split` before it gets feedback (the store
    then keeps it), so a test's split is fixed instead of following arrival order."""
    with store.session() as session:
        session.get(Message, message_id).placement = placed_in(split, settings)


def _fake_item(message_id: str, placement: float = 0.5) -> FeedbackItem:
    return FeedbackItem(
        message_id=message_id,
        conversation_id="conv",
        prompt_message_id="prompt",
        feedback_id="fb",
        context=[turn("user", "q")],
        answer="a",
        rating=5,
        correction=None,
        finish_reason="stop",
        adapter_id=None,
        created_at=datetime.now(UTC),
        placement=placement,
    )


def base_answers(replay: int = 20, validation: int = 3, regression: int = 3) -> dict:
    return {
        "replay": [
            {"prompt": f"replay prompt {i:03d}", "answer": f"replay answer {i:03d}"}
            for i in range(replay)
        ],
        "validation": [
            {"prompt": f"val prompt {i:03d}", "answer": f"val answer {i:03d}"}
            for i in range(validation)
        ],
        "regression": [
            {"prompt": f"reg prompt {i:03d}", "answer": f"reg answer {i:03d}"}
            for i in range(regression)
        ],
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/w.db")
    yield store
    store.close()


def ask(
    store: Store,
    question: str,
    answer: str,
    *,
    system: str | None = None,
    **feedback: Any,
) -> str:
    """A one-turn conversation whose answer gets `feedback`; returns the answer's id."""
    conversation = store.create_conversation(system_prompt=system)
    store.add_message(conversation.id, "user", question)
    message = store.add_message(conversation.id, "assistant", answer, finish_reason="stop")
    store.add_feedback(message.id, **feedback)
    return message.id


def answer_in(
    store: Store,
    settings: Settings,
    split: str,
    text: str,
    *,
    conversation_id: str | None = None,
    prompt_id: str | None = None,
    **feedback: Any,
) -> str:
    """An answer placed in `split` (its stored placement written first, so the store keeps
    it), rated with `feedback`; a new one-turn conversation unless conversation_id/prompt_id
    are given."""
    if conversation_id is None:
        conversation_id = store.create_conversation().id
        prompt_id = store.add_message(conversation_id, "user", f"question for {text}").id
    message = store.add_message(
        conversation_id, "assistant", text, finish_reason="stop", reply_to_id=prompt_id
    )
    place(store, message.id, split, settings)
    if feedback:
        store.add_feedback(message.id, **feedback)
    return message.id


def row_texts(data: training_data.TrainingData) -> dict[str, str]:
    return {
        "sft": json.dumps(data.sft),
        "validation": json.dumps(data.validation),
        "dpo": json.dumps(data.dpo),
        "kto": json.dumps(data.kto),
    }


# --- the frozen holdout -------------------------------------------------------------------


def test_holdout_never_reaches_training_rows(store: Store, home: Path) -> None:
    settings = make_settings(home)
    texts: dict[str, list[str]] = {}  # message id -> its answer and correction texts

    for i in range(50):
        answer = f"ans{i:03d} words here"
        system = f"system {i}" if i % 3 == 0 else None
        kind = i % 5
        if kind == 0:
            feedback: dict[str, Any] = {"rating": 5}
        elif kind == 1:
            feedback = {"rating": 1, "correction": f"cor{i:03d} better words"}
        elif kind == 2:
            feedback = {"rating": 2}
        elif kind == 3:
            feedback = {"correction": f"cor{i:03d} wanted words"}
        else:
            feedback = {"rating": 3 if i % 2 else 4}
        message_id = ask(store, f"question {i:03d}?", answer, system=system, **feedback)
        texts[message_id] = [answer] + (
            [feedback["correction"]] if "correction" in feedback else []
        )

    # Two answers to the same prompt rated differently, five times; the first pair straddles
    # holdout and train (the holdout one rated higher: a leak would make it "chosen").
    for pair in range(5):
        conversation = store.create_conversation()
        prompt = store.add_message(conversation.id, "user", f"pair question {pair}")
        for rank, (split, rating) in enumerate(zip(("holdout", "train"), (5, 2), strict=True)):
            text = f"pair{pair}{rank} answer"
            if pair == 0:
                message_id = answer_in(
                    store,
                    settings,
                    split,
                    text,
                    conversation_id=conversation.id,
                    prompt_id=prompt.id,
                    rating=rating,
                )
            else:
                message = store.add_message(
                    conversation.id, "assistant", text, finish_reason="stop"
                )
                store.add_feedback(message.id, rating=rating)
                message_id = message.id
            texts[message_id] = [text]

    items = feedback_items(store)
    assert len(items) == 60
    data = build(items, settings, base_answers(), count_words)
    holdout_ids = {item.message_id for item in data.split.holdout}
    assert holdout_ids, "some items must land in the holdout for the test to mean anything"

    rows = row_texts(data)
    for message_id in holdout_ids:
        for text in texts[message_id]:
            for kind, dumped in rows.items():
                assert text not in dumped, f"holdout text {text!r} leaked into {kind} rows"

    # The rows are not empty: training items do arrive where they belong.
    assert data.sft and data.dpo and data.kto and data.validation
    for item in data.split.train:
        target = training_data.sft_target(item)
        if target is not None:
            assert target in rows["sft"]
        if item.rating in (1, 2, 4, 5):
            assert item.answer in rows["kto"]
        if item.correction is not None:
            assert item.correction in rows["kto"]

    ids = data.snapshot()["message_ids"]
    train, validation, holdout = set(ids["train"]), set(ids["validation"]), set(ids["holdout"])
    assert not (train & validation or train & holdout or validation & holdout)
    assert train | validation | holdout == {item.message_id for item in items}
    assert len(ids["train"]) + len(ids["validation"]) + len(ids["holdout"]) == len(items)
    assert data.counts["holdout_items"] == len(holdout)


# --- stable placement ---------------------------------------------------------------------


def test_items_keep_their_split_as_feedback_grows(store: Store, home: Path) -> None:
    settings = make_settings(home)
    fractions = (settings.training.holdout_fraction, settings.training.validation_fraction)
    early = [ask(store, f"early question {i}", f"early answer {i}", rating=5) for i in range(30)]
    before = split_items(feedback_items(store), *fractions)
    store.mark_used(early)  # a night's run took them: they never move again
    for i in range(30):
        ask(store, f"later question {i}", f"later answer {i}", rating=1 + i % 5)
    # Feedback changing kind (a rated answer corrected later) and answers forgotten in between
    # move nothing either, once a run used them.
    for message_id in early[3:8]:
        store.add_feedback(message_id, correction="a better answer")
    forgotten = ask(store, "forget me", "forgotten answer", rating=1)
    store.forget_conversation(store.get_message(forgotten).conversation_id)
    after = split_items(feedback_items(store), *fractions)

    def by_split(split: Split) -> dict[str, str]:
        return {
            item.message_id: name
            for name in ("train", "validation", "holdout")
            for item in getattr(split, name)
        }

    old, new = by_split(before), by_split(after)
    assert len(old) == 30 and len(new) == 60
    assert {message_id: new[message_id] for message_id in old} == old


def test_the_first_days_feedback_splits_at_the_configured_shares(store: Store, home: Path) -> None:
    """A person's first corrections and liked answers reach the holdout at its share from the
    start (a hash of random ids held out none of ten about one time in ten), and the very
    first one trains."""
    settings = make_settings(home)
    fractions = (settings.training.holdout_fraction, settings.training.validation_fraction)
    for i in range(40):
        ask(store, f"fact question {i}", "I don't know.", rating=1, correction=f"fact {i}")
        ask(store, f"chat question {i}", f"chat answer {i}", rating=1 + i % 5)
        items = feedback_items(store)
        split = split_items(items, *fractions)
        if i == 0:
            assert [item.message_id for item in split.train] == [item.message_id for item in items]
        for kind in PLACEMENT_KINDS:  # corrections, liked answers (4-5), the rest

            def count(part: list[FeedbackItem], kind: str = kind) -> int:
                return sum(placement_kind(item.correction, item.rating) == kind for item in part)

            # Every prefix of each kind: the configured share, give or take one answer.
            seen = count(items)
            assert abs(count(split.holdout) - fractions[0] * seen) < 1, (i, kind)
            assert abs(count(split.validation) - fractions[1] * seen) < 1.5, (i, kind)

    # What the gate counts: held-out items with a target, at the holdout's share of them.
    def targets(part: list[FeedbackItem]) -> int:
        return sum(sft_target(item) is not None for item in part)

    assert abs(targets(split.holdout) - fractions[0] * targets(items)) < 2  # one per kind


def test_spread_placements_honour_any_configured_fractions() -> None:
    placements = [spread_placement(k) for k in range(2000)]
    assert all(0 <= value < 1 for value in placements)
    items = [_fake_item(f"msg_{k}", value) for k, value in enumerate(placements)]
    for holdout, validation in ((0.2, 0.1), (0.05, 0.0), (0.5, 0.3)):
        split = split_items(items, holdout, validation)
        assert abs(len(split.holdout) - 2000 * holdout) <= 2
        assert abs(len(split.validation) - 2000 * validation) <= 2
        assert len(split.train) + len(split.validation) + len(split.holdout) == 2000


# --- forgetting ---------------------------------------------------------------------------


def test_forgotten_conversation_contributes_nothing(store: Store, home: Path) -> None:
    settings = make_settings(home)
    for i in range(6):
        answer_in(store, settings, "train", f"kept answer {i}", rating=5)
    secret = store.create_conversation(system_prompt="secret system")
    prompt = store.add_message(secret.id, "user", "secret question")
    secret_id = answer_in(
        store,
        settings,
        "train",
        "secret answer",
        conversation_id=secret.id,
        prompt_id=prompt.id,
        rating=1,
        correction="secret correction",
    )
    validation_secret = answer_in(store, settings, "validation", "other", rating=5)
    store.add_feedback(validation_secret, correction="secret validation correction")
    with_secret = build(feedback_items(store), settings, base_answers(), count_words)
    assert "secret" in json.dumps(with_secret.sft)  # it would be trained on

    validation_conversation = store.get_message(validation_secret).conversation_id
    store.forget_conversation(secret.id)
    store.forget_conversation(validation_conversation)
    data = build(feedback_items(store), settings, base_answers(), count_words)
    for kind, dumped in row_texts(data).items():
        assert "secret" not in dumped, kind
    snapshot = json.dumps(data.snapshot())
    assert secret_id not in snapshot and validation_secret not in snapshot
    assert data.counts["feedback_items"] == 6


# --- replay -------------------------------------------------------------------------------


def _person_items(store: Store, settings: Settings, n: int) -> list[FeedbackItem]:
    for i in range(n):
        answer_in(store, settings, "train", f"person answer {i}", rating=5)
    items = feedback_items(store)
    assert len(items) == n
    return items


@pytest.mark.parametrize(
    ("fraction", "available", "expected"),
    [
        (0.5, 20, 6),  # replay = person * r / (1 - r)
        (0.5, 4, 4),  # capped by the base answers there are
        (0.25, 20, 2),
        (0.0, 20, 0),
    ],
)
def test_replay_share(
    store: Store, home: Path, fraction: float, available: int, expected: int
) -> None:
    settings = make_settings(home, training={"replay_fraction": fraction})
    items = _person_items(store, settings, 6)
    data = build(items, settings, base_answers(replay=available), count_words)
    assert data.counts["sft_rows"] == 6
    assert data.counts["replay_rows"] == expected
    replayed = [row for row in data.sft if row["prompt"][0]["content"].startswith("replay prompt")]
    assert len(replayed) == expected
    assert len(data.sft) == 6 + expected
    for row in replayed:
        number = row["prompt"][0]["content"].removeprefix("replay prompt ")
        assert row["completion"] == [turn("assistant", f"replay answer {number}")]
    # Base answers are never the person's: regression probes go to the gate untouched.
    assert data.regression == base_answers()["regression"]


def test_replay_is_reproducible(store: Store, home: Path) -> None:
    settings = make_settings(home)
    items = _person_items(store, settings, 5)
    first = build(items, settings, base_answers(), count_words)
    second = build(items, settings, base_answers(), count_words)
    assert first.sft == second.sft


# --- KTO weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desirable", "undesirable"),
    [(10, 2), (2, 10), (5, 5), (4, 3), (1, 1), (3, 4), (10, 7), (1, 100), (100, 1)],
)
def test_kto_weights_balance_the_classes(desirable: int, undesirable: int) -> None:
    w_desirable, w_undesirable = kto_weights(desirable, undesirable)
    assert w_desirable >= 1 and w_undesirable >= 1  # weights only ever scale one class up
    ratio = desirable * w_desirable / (undesirable * w_undesirable)
    # The weights are rounded to 4 decimals; allow for that, nothing more.
    assert 1 - 1e-4 <= ratio <= 4 / 3 + 1e-4


@pytest.mark.parametrize(("desirable", "undesirable"), [(0, 5), (5, 0), (0, 0)])
def test_kto_weights_with_one_class_missing(desirable: int, undesirable: int) -> None:
    assert kto_weights(desirable, undesirable) == (1.0, 1.0)


# --- fitting long conversations -----------------------------------------------------------


SYSTEM = turn("system", "be brief")  # 2 words
LONG = [
    SYSTEM,
    turn("user", "one " * 10),
    turn("assistant", "two " * 10),
    turn("user", "three " * 10),
    turn("assistant", "four " * 10),
    turn("user", "five " * 10),
    turn("assistant", "six " * 10),
    turn("user", "last question"),  # 2 words
]
ANSWER = "the answer"  # 2 words


def test_fit_prompt_keeps_everything_that_fits() -> None:
    assert fit_prompt(LONG, ANSWER, 66, count_words) == LONG


@pytest.mark.parametrize(
    ("max_length", "kept"),
    [
        (65, [SYSTEM, *LONG[3:]]),  # the first exchange goes first
        (46, [SYSTEM, *LONG[3:]]),
        (45, [SYSTEM, *LONG[5:]]),
        (26, [SYSTEM, *LONG[5:]]),
        (25, [SYSTEM, LONG[-1]]),
        (6, [SYSTEM, LONG[-1]]),
    ],
)
def test_fit_prompt_cuts_from_the_left(max_length: int, kept: list[dict[str, str]]) -> None:
    fitted = fit_prompt(LONG, ANSWER, max_length, count_words)
    assert fitted == kept
    assert fitted[0] == SYSTEM and fitted[-1] == LONG[-1]
    assert fitted[1]["role"] == "user"  # the context after the system prompt starts with a user
    assert count_words(fitted, ANSWER) <= max_length


def test_fit_prompt_without_system_prompt() -> None:
    no_system = LONG[1:]
    assert fit_prompt(no_system, ANSWER, 44, count_words) == no_system[2:]
    assert fit_prompt(no_system, ANSWER, 43, count_words) == no_system[4:]
    assert fit_prompt(no_system, ANSWER, 4, count_words) == [LONG[-1]]
    assert fit_prompt(no_system, ANSWER, 3, count_words) is None


def test_fit_prompt_gives_up_when_the_shortest_form_does_not_fit() -> None:
    assert fit_prompt(LONG, ANSWER, 5, count_words) is None
    assert fit_prompt(LONG, "word " * 200, 100, count_words) is None


def test_build_drops_rows_that_cannot_fit(store: Store, home: Path) -> None:
    settings = make_settings(home, model={"max_seq_length": 128})
    answer_in(store, settings, "train", "short answer", rating=5)
    answer_in(store, settings, "train", "long " * 200, rating=5)
    data = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    assert data.counts["sft_rows"] == 1
    assert data.dropped == {"sft": 1, "kto": 1}
    assert "long" not in json.dumps(data.sft)


def test_dpo_rows_fit_max_seq_length(store: Store, home: Path) -> None:
    settings = make_settings(home, model={"max_seq_length": 128}, training={"replay_fraction": 0})
    conversation = store.create_conversation(system_prompt="be brief")
    for i in range(6):
        store.add_message(conversation.id, "user", f"question {i} " + "pad " * 10)
        store.add_message(conversation.id, "assistant", "reply " * 10, finish_reason="stop")
    prompt = store.add_message(conversation.id, "user", "final question")
    # Chosen: one long "word" (many characters, 1 token); rejected: 60 short words.
    answer_in(
        store,
        settings,
        "train",
        "a " * 60,
        conversation_id=conversation.id,
        prompt_id=prompt.id,
        correction="x" * 300,
    )
    data = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    assert data.dpo
    for row in data.dpo:
        for side in ("chosen", "rejected"):
            assert count_words(row["prompt"], row[side][0]["content"]) <= 128, side


# --- is a run worth starting? -------------------------------------------------------------


def test_sufficiency_without_feedback(store: Store, home: Path) -> None:
    verdict = training_data.sufficiency(store, make_settings(home), None)
    assert not verdict.enough
    assert verdict.new_items == 0
    assert "no feedback" in verdict.reason


def test_sufficiency_counts_new_trainable_items(store: Store, home: Path) -> None:
    settings = make_settings(home, schedule={"min_new_examples": 3})
    old = [answer_in(store, settings, "train", f"good {i}", rating=5) for i in range(2)]
    # Held-out ratings are new feedback but cannot be learned from: they never count (a
    # held-out correction does: test_a_single_new_correction_is_worth_a_run).
    answer_in(store, settings, "holdout", "judged only", rating=5)
    answer_in(store, settings, "holdout", "judged only too", rating=1)

    verdict = training_data.sufficiency(store, settings, None)
    assert not verdict.enough
    assert verdict.new_items == 2
    assert "2 new" in verdict.reason
    assert "schedule.min_new_examples is 3" in verdict.reason

    old.append(answer_in(store, settings, "train", "good 2", correction="better 2"))
    verdict = training_data.sufficiency(store, settings, None)
    assert verdict.enough
    assert verdict.new_items == 3

    # The champion was trained on all of it: nothing new.
    champion = build(feedback_items(store), settings, base_answers(), count_words).snapshot()
    champion = json.loads(json.dumps(champion))  # as stored in meta.json
    assert set(champion["message_ids"]["train"]) == set(old)
    verdict = training_data.sufficiency(store, settings, champion)
    assert not verdict.enough
    assert verdict.new_items == 0
    assert "0 new feedback item(s) since the champion was trained" in verdict.reason

    # New ratings alone wait for min_new_examples of them.
    answer_in(store, settings, "train", "new one", rating=4)
    answer_in(store, settings, "train", "new two", rating=5)
    verdict = training_data.sufficiency(store, settings, champion)
    assert verdict.new_items == 2
    assert not verdict.enough

    # A later correction of an answer the champion already saw is new feedback, and a
    # correction is trained on the night it is made, however few items came with it.
    store.add_feedback(old[0], correction="actually, this")
    verdict = training_data.sufficiency(store, settings, champion)
    assert verdict.new_items == 3
    assert verdict.enough


def test_a_single_new_correction_is_worth_a_run(store: Store, home: Path) -> None:
    settings = make_settings(home, schedule={"min_new_examples": 8})
    answer_in(store, settings, "train", "my cat", rating=5)
    verdict = training_data.sufficiency(store, settings, None)
    assert not verdict.enough and "rate or correct about" in verdict.reason
    # Rated first, corrected after (the order the chat invites). One the gate holds out
    # tonight is judged by tonight's gate and learned by the catch-up after a promotion:
    # it is worth a run too, but only with the catch-up on.
    held = answer_in(store, settings, "holdout", "my fish", rating=1)
    store.add_feedback(held, correction="Your fish is called Bubbles.")
    verdict = training_data.sufficiency(store, settings, None)
    assert verdict.enough, verdict.reason
    assert "1 held out for tonight's gate, then trained by the catch-up" in verdict.reason
    no_catch_up = make_settings(
        home, schedule={"min_new_examples": 8}, training={"catch_up": False}
    )
    assert not training_data.sufficiency(store, no_catch_up, None).enough
    fixed = answer_in(store, settings, "train", "my dog", rating=1)
    store.add_feedback(fixed, correction="Your dog is called Biscuit.")
    verdict = training_data.sufficiency(store, settings, None)
    assert verdict.enough, verdict.reason
    assert verdict.new_items == 2
    assert (
        "2 new feedback item(s), 1 of them correction(s); 1 held out for tonight's gate, then "
        "trained by the catch-up: a correction is trained on the night" in verdict.reason
    )


def test_sufficiency_with_feedback_only_in_the_holdout(store: Store, home: Path) -> None:
    settings = make_settings(home, schedule={"min_new_examples": 1})
    answer_in(store, settings, "holdout", "judged only", rating=5)
    verdict = training_data.sufficiency(store, settings, None)
    assert not verdict.enough
    assert "no feedback to learn from" in verdict.reason


def test_sufficiency_ignores_ratings_that_teach_nothing(store: Store, home: Path) -> None:
    settings = make_settings(home, schedule={"min_new_examples": 3})
    answer_in(store, settings, "train", "good", rating=5)
    for i in range(3):
        answer_in(store, settings, "train", f"meh {i}", rating=3)
    data = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    assert data.counts["sft_rows"] + data.counts["dpo_rows"] + data.counts["kto_rows"] == 2
    verdict = training_data.sufficiency(store, settings, None)
    assert not verdict.enough


def test_shipped_prompt_sets_are_disjoint() -> None:
    """Nothing the gate measures on is trained on: replay, validation, regression and the
    general-knowledge probes share no prompt (and the scripted person's data none either)."""
    from development import probes
    from tests.scripted_person import FACTS, GENERAL

    sets = {
        "replay": set(probes.REPLAY),
        "validation": set(probes.VALIDATION),
        "regression": set(probes.REGRESSION),
        "facts": {question for question, *_ in probes.FACT_PROBES},
    }
    for name, prompts in sets.items():
        for other, other_prompts in sets.items():
            if name < other:
                assert not prompts & other_prompts, (name, other, prompts & other_prompts)
    taught = {q for fact in FACTS for q in fact.questions} | {q for q, _ in GENERAL}
    assert not taught & sets["facts"]
    for fact in FACTS:
        assert not set(fact.probes) & taught


def test_continuing_the_champion_trains_all_new_rows_and_replays_a_sample_of_the_earlier(
    store: Store, home: Path
) -> None:
    # Corrections asked in other words are tested on their own: one row per item here.
    settings = make_settings(home, training={"earlier_rows_per_new": 1.0, "correction_variants": 0})
    fixed = [
        answer_in(store, settings, "train", f"old {i}", correction=f"old fix {i}") for i in range(3)
    ]
    for i in range(6):
        answer_in(store, settings, "train", f"old liked {i}", rating=5)
    champion = json.loads(
        json.dumps(build(feedback_items(store), settings, base_answers(), count_words).snapshot())
    )
    new = [
        answer_in(store, settings, "train", f"new {i}", correction=f"new fix {i}") for i in range(2)
    ]
    # A later correction of an answer the champion saw is new too.
    store.add_feedback(fixed[0], correction="old fix 0, corrected again")

    def targets(data: training_data.TrainingData) -> list[str]:
        return [row["completion"][0]["content"] for row in data.sft if "old" in str(row)]

    data = build(feedback_items(store), settings, base_answers(replay=0), count_words, champion)
    seen = targets(data)
    assert {"new fix 0", "new fix 1", "old fix 0, corrected again"} <= {
        row["completion"][0]["content"] for row in data.sft
    }
    # Three new rows, and as many earlier ones: every earlier correction (the facts taught),
    # then a sample of the liked answers.
    assert data.counts["earlier_sft_rows"] == 3
    assert {"old fix 1", "old fix 2"} <= set(seen)
    assert len([t for t in seen if t.startswith("old liked ")]) == 1

    # Nothing new since the champion: nothing to replay the earlier rows against.
    everything = json.loads(json.dumps(data.snapshot()))
    idle = build(feedback_items(store), settings, base_answers(replay=0), count_words, everything)
    assert idle.sft == [] and idle.counts["earlier_sft_rows"] == 0

    # Without the champion (a fresh adapter) every row is trained on.
    fresh = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    assert fresh.counts["earlier_sft_rows"] == 0 and len(fresh.sft) == 11
    assert len(new) == 2


def test_continuing_replays_the_earlier_rows_and_base_answers_the_champion_knows_least(
    store: Store, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fact the champion lost (say, to a rollback) is in its worst-scored earlier rows, and
    base answers it has drifted from anchor more than ones it has memorised: those go in."""
    settings = make_settings(
        home,
        training={
            "earlier_rows_per_new": 1.0,
            "replay_fraction": 0.5,
            "correction_variants": 0,
            # Past this many earlier corrections, those the champion knows least.
            "earlier_corrections_max": 2,
        },
    )
    for i in range(6):
        answer_in(store, settings, "train", f"old {i}", correction=f"old fix {i}")
    champion = json.loads(
        json.dumps(build(feedback_items(store), settings, base_answers(), count_words).snapshot())
    )
    for i in range(2):
        answer_in(store, settings, "train", f"new {i}", correction=f"new fix {i}")
    forgotten = {"old fix 4", "old fix 1", "replay answer 007", "replay answer 002"}
    scored: list[int] = []

    def champion_loss(rows: list[dict]) -> list[float]:
        scored.append(len(rows))
        return [2.0 if row["completion"][0]["content"] in forgotten else 0.1 for row in rows]

    data = build(
        feedback_items(store),
        settings,
        base_answers(replay=8),
        count_words,
        champion,
        champion_loss,
    )
    targets = {row["completion"][0]["content"] for row in data.sft}
    assert data.counts["earlier_sft_rows"] == 2 and data.counts["replay_rows"] == 4
    assert {"old fix 4", "old fix 1", "new fix 0", "new fix 1"} <= targets
    assert {"replay answer 007", "replay answer 002"} <= targets
    assert scored == [6, 8] and data.counts["scored_by_champion"] == 14

    # Of many base answers, twice as many as wanted are scored.
    many = build(
        feedback_items(store),
        settings,
        base_answers(replay=30),
        count_words,
        champion,
        champion_loss,
    )
    assert many.counts["replay_rows"] == 4 and scored[2:] == [6, 8]

    # A fresh adapter trains on every row and scores nothing: there is no champion to ask.
    fresh = build(
        feedback_items(store), settings, base_answers(replay=8), count_words, None, champion_loss
    )
    assert fresh.counts["sft_rows"] == 8 and fresh.counts["scored_by_champion"] == 0
    assert len(scored) == 4

    # Of a long history, at most EARLIER_SCORED earlier rows: the night's cost does not grow
    # with all the feedback ever given.
    monkeypatch.setattr(training_data, "EARLIER_SCORED", 5)
    long = build(
        feedback_items(store),
        settings,
        base_answers(replay=8),
        count_words,
        champion,
        champion_loss,
    )
    assert long.counts["earlier_sft_rows"] == 2 and scored[4:] == [5, 8]


def test_a_run_passes_over_few_rows_a_bounded_number_of_times_and_continues_at_its_rate(
    home: Path,
) -> None:
    from types import SimpleNamespace

    from development.train import plan_stages

    settings = make_settings(
        home,
        training={"continue_epochs": 3.0, "max_epochs": 5.0, "continue_learning_rate_scale": 0.5},
    )
    rows = [{"prompt": [], "completion": []}] * 10
    data = SimpleNamespace(
        sft=rows, dpo=[], kto=[], counts={"sft_rows": 5, "replay_rows": 5, "kto_desirable": 0}
    )
    profile = settings.profile("quick_test")  # 40 steps of 4 rows at 1e-3
    fresh = plan_stages(data, settings, "quick_test")
    assert fresh[0].max_steps == 13  # 5 passes over 10 rows, 4 a step
    assert fresh[0].learning_rate == profile.learning_rate
    assert "5 epochs (training.max_epochs)" in fresh[0].why
    continued = plan_stages(data, settings, "quick_test", continuing=True)
    assert continued[0].max_steps == 8  # 3 passes
    assert continued[0].learning_rate == profile.learning_rate / 2
    assert "3 epochs (training.continue_epochs)" in continued[0].why
    assert "learning rate x0.5 when continuing" in continued[0].why
    # Enough rows: the profile's own budget is the bound.
    data.sft = rows * 10
    assert plan_stages(data, settings, "quick_test")[0].max_steps == profile.max_steps == 40
    assert plan_stages(data, settings, "quick_test", continuing=True)[0].max_steps == 40


# --- placement in any feedback order, and the rolling holdout ------------------------------

FEEDBACK_ORDERS = {
    # What the TUI sends: the stars first, then `c` and the corrected text.
    "rate then correct": ({"rating": 1}, {"correction": "{fix}"}),
    "one request": ({"rating": 1, "correction": "{fix}"},),
    "correct then rate": ({"correction": "{fix}"}, {"rating": 2}),
    "correct, then edit it": ({"correction": "first try"}, {"correction": "{fix}"}),
    "like, change to a low rating, correct": (
        {"rating": 5},
        {"rating": 2},
        {"correction": "{fix}"},
    ),
}


@pytest.mark.parametrize("order", sorted(FEEDBACK_ORDERS))
def test_placement_shares_by_kind_in_any_feedback_order(
    store: Store, home: Path, order: str
) -> None:
    """A newcomer's day: corrections given in `order`, interleaved with liked and disliked
    ratings. Each kind reaches the holdout at its share (give or take one), and the placements
    are those of the corrections given in one request: the order never decides."""
    settings = make_settings(home)
    fractions = (settings.training.holdout_fraction, settings.training.validation_fraction)
    corrections, others = [], []
    for i in range(20):
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", f"fact question {i}")
        message = store.add_message(conversation.id, "assistant", "wrong", finish_reason="stop")
        for step in FEEDBACK_ORDERS[order]:
            store.add_feedback(
                message.id,
                **{
                    k: v.format(fix=f"fact {i}") if isinstance(v, str) else v
                    for k, v in step.items()
                },
            )
        corrections.append(message.id)
        others.append(ask(store, f"chat {i}", f"chat answer {i}", rating=(1, 5, 2, 4)[i % 4]))

    items = feedback_items(store)
    split = split_items(items, *fractions)
    for kind in PLACEMENT_KINDS:
        of_kind = [item for item in items if placement_kind(item.correction, item.rating) == kind]
        held = [item for item in split.holdout if item in of_kind]
        assert abs(len(held) - fractions[0] * len(of_kind)) < 1, (kind, len(held), len(of_kind))
    placed = sorted(store.get_message(m).placement for m in corrections)
    assert placed == sorted(spread_placement(k) for k in range(20))
    # The ratings' own sequences stay whole: no two answers of a kind share a place.
    low = [
        store.get_message(m).placement
        for m in others
        if store.get_message(m).placement_kind == "other"
    ]
    assert len(low) == len(set(low)) == 10


def test_a_used_answer_keeps_its_placement_when_corrected(store: Store) -> None:
    rated = ask(store, "q", "a", rating=1)
    used = ask(store, "q2", "a2", rating=1)
    assert store.get_message(used).placement == spread_placement(1)
    store.mark_used([used])
    store.add_feedback(rated, correction="fixed")
    store.add_feedback(used, correction="fixed too")
    assert store.get_message(rated).placement == spread_placement(0)  # the first correction
    assert store.get_message(rated).placement_kind == "correction"
    assert store.get_message(used).placement == spread_placement(1)  # a run saw it: stays
    # The low-rating place the first answer left is taken by the next low rating.
    third = ask(store, "q3", "a3", rating=2)
    assert store.get_message(third).placement == spread_placement(0)


def test_the_rolling_holdout_trains_on_what_a_gate_judged(store: Store, home: Path) -> None:
    """Night 1 holds some corrections out for its gate; night 2 trains on them, and its gate
    judges only items neither night trained on."""
    settings = make_settings(home)
    for i in range(10):
        ask(store, f"fact question {i}", "wrong", rating=1, correction=f"fact number {i}")
    night1 = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    held1 = set(night1.snapshot()["message_ids"]["holdout"])
    validated1 = set(night1.snapshot()["message_ids"]["validation"])
    assert held1 and validated1
    trained1 = row_texts(night1)["sft"]
    for item in night1.split.holdout + night1.split.validation:
        assert item.correction not in trained1  # never trained on before a gate judged it
    store.mark_used(i for ids in night1.snapshot()["message_ids"].values() for i in ids)
    # The gate judged the candidate on night 1's holdout (its run stopped early on validation).
    cand = "cand-1"
    store.record_candidate(cand, base_model="m", run_id=None, parent_id=None, metrics={})
    store.record_evaluation(
        cand, decision="promote", rule="all_passed", judged_message_ids=held1 | validated1
    )
    for i in range(10, 20):
        ask(store, f"fact question {i}", "wrong", rating=1, correction=f"fact number {i}")
    night2 = build(feedback_items(store), settings, base_answers(replay=0), count_words)
    ids2 = night2.snapshot()["message_ids"]
    assert held1 | validated1 <= set(ids2["train"])  # learned, one night late
    assert set(ids2["holdout"]).isdisjoint(set(night1.snapshot()["message_ids"]["train"]) | held1)
    assert ids2["holdout"]  # the new day's share of corrections, never trained on
    trained2 = row_texts(night2)["sft"]
    for item in night2.split.holdout:
        assert item.correction not in trained2


def test_every_stage_is_capped_in_epochs(home: Path) -> None:
    """A newcomer's standard run made 100 DPO steps over 5 pairs; every stage now passes over
    its rows at most training.max_epochs times."""
    from types import SimpleNamespace

    from development.train import plan_stages

    settings = make_settings(home)
    counts = {"sft_rows": 10, "replay_rows": 5, "kto_desirable": 3, "kto_undesirable": 3}
    dpo = SimpleNamespace(sft=[{}] * 15, dpo=[{}] * 5, kto=[], counts=counts, kto_weights=(1, 1))
    stages = plan_stages(dpo, settings, "standard")
    # standard: 16 rows a step; 4 epochs of 15 rows is 4 steps, of 5 pairs 2.
    assert [(s.name, s.max_steps) for s in stages] == [("sft", 4), ("dpo", 2)]
    assert "4 epochs (training.max_epochs)" in stages[1].why
    kto = SimpleNamespace(sft=[{}] * 15, dpo=[], kto=[{}] * 6, counts=counts, kto_weights=(1, 1))
    assert [(s.name, s.max_steps) for s in plan_stages(kto, settings, "standard")] == [
        ("sft", 4),
        ("kto", 2),
    ]
    big = SimpleNamespace(
        sft=[{}] * 4000, dpo=[{}] * 4000, kto=[], counts=counts, kto_weights=(1, 1)
    )
    assert [s.max_steps for s in plan_stages(big, settings, "standard")] == [200, 100]


def test_skip_reasons_say_what_to_do_next(store: Store, home: Path) -> None:
    settings = make_settings(home)
    verdict = training_data.sufficiency(store, settings, None)
    assert "rate answers you like 4-5 or correct wrong ones" in verdict.reason
    for i in range(3):
        ask(store, f"q {i}", "right", rating=5)
    verdict = training_data.sufficiency(store, settings, None)
    assert not verdict.enough
    # 2 of the 3 count (one is held out first); 6 more are needed after the holdout's fifth.
    assert "rate or correct about 8 more answer(s)" in verdict.reason
    assert "`whetstone train --force`" in verdict.reason


def test_a_new_correction_is_also_asked_in_other_words(store: Store, home: Path) -> None:
    settings = make_settings(home)
    fixed = ask(store, "What is my cat's name?", "Luna.", rating=1, correction="Pixel.")
    ask(store, "What is a cloud?", "Water.", rating=5)
    written = {"What is my cat's name?": ["What do I call my cat?"]}
    data = build(
        feedback_items(store), settings, base_answers(replay=0), count_words, paraphrases=written
    )
    asked = sorted(
        row["prompt"][-1]["content"]
        for row in data.sft
        if row["completion"][0]["content"] == "Pixel."
    )
    assert asked == sorted(
        [
            "What is my cat's name?",
            "What do I call my cat?",  # the model's paraphrase first
            "What is the name of my cat?",  # then rewrites of the question's shape
            "What is my cat called?",
            "What name did I give my cat?",
        ]
    )
    assert data.counts["reworded_sft_rows"] == 4
    # Off: the question as asked only; a liked answer is never reworded.
    off = make_settings(home, training={"correction_variants": 0})
    plain = build(feedback_items(store), off, base_answers(replay=0), count_words)
    assert plain.counts["reworded_sft_rows"] == 0 and plain.counts["sft_rows"] == 2
    # A correction the champion already learned is not reworded again.
    champion = json.loads(json.dumps(data.snapshot()))
    again = build(feedback_items(store), settings, base_answers(replay=0), count_words, champion)
    assert again.counts["reworded_sft_rows"] == 0
    assert fixed in champion["message_ids"]["train"]


def test_status_says_how_the_last_run_ended_and_what_next(store: Store) -> None:
    """/v1/status's last_run (what the TUI's status screen shows when nothing runs)."""
    from orchestrator.status import last_outcome as _last_run

    assert _last_run(store) is None
    skipped = store.create_run("quick_test", "manual")
    store.update_run(skipped.id, status="skipped", reason="2 new feedback item(s) in total")
    assert _last_run(store)["reason"] == "2 new feedback item(s) in total"
    judged = store.create_run("quick_test", "nightly")
    store.record_candidate("cand-1", base_model="m", run_id=judged.id, parent_id=None, metrics={})
    store.update_run(judged.id, status="succeeded", candidate_id="cand-1")
    store.record_evaluation(
        "cand-1",
        decision="reject",
        rule="general_regression",
        metrics={"reason": "NLL +9%", "next_step": "train again with more replay"},
    )
    store.create_run("quick_test", "manual")  # queued: not what the last run did
    last = _last_run(store)
    assert (last["id"], last["decision"], last["rule"]) == (
        judged.id,
        "reject",
        "general_regression",
    )
    assert (last["gate_reason"], last["next_step"]) == ("NLL +9%", "train again with more replay")


def test_a_run_freezes_what_it_reads_before_a_correction_arrives(store: Store) -> None:
    """The TUI sends the rating first: a run that starts in between reads the answer as a low
    rating, and the correction that follows must not move it out of where the run used it."""
    rated = ask(store, "What is my cat's name?", "Luna.", rating=1)
    unrated = store.add_message(store.create_conversation().id, "user", "no feedback yet")
    frozen = store.freeze_placements()
    assert frozen == {rated} and unrated.id not in frozen
    placed = store.get_message(rated).placement
    store.add_feedback(rated, correction="Pixel.")
    assert store.get_message(rated).placement == placed
    assert store.get_message(rated).placement_kind == "other"  # as the run read it


def test_what_was_taught_since_the_champion_is_its_new_trained_corrections() -> None:
    from dataclasses import replace

    old, new, held, liked = (_fake_item(i) for i in ("m-old", "m-new", "m-held", "m-liked"))
    old, new, held = (replace(i, correction=f"fix {i.message_id}") for i in (old, new, held))
    items = [old, new, held, liked]
    candidate = {"message_ids": {"train": ["m-old", "m-new", "m-liked"], "holdout": ["m-held"]}}
    champion = {"message_ids": {"train": ["m-old"]}}
    taught = training_data.taught_in(items, candidate, champion)
    assert [i.message_id for i in taught] == ["m-new"]
    # No champion: every correction the candidate trained on.
    assert [i.message_id for i in training_data.taught_in(items, candidate, None)] == [
        "m-old",
        "m-new",
    ]


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("Your cat is called Pixel.", True),
        ("Pixel!", True),
        ("Your cat's name is Luna.", False),
        ("I don't know your cat.", False),
        ("", False),
    ],
)
def test_an_answer_says_a_correction_by_the_words_the_question_lacks(
    answer: str, said: bool
) -> None:
    from development.evaluate import says_it

    assert says_it(answer, "Your cat is called Pixel.", "What is my cat's name?") is said


def test_an_earlier_correction_the_champion_knows_only_as_asked_comes_back_in_other_words(
    store: Store, home: Path
) -> None:
    """A fact taught once and trained on one night is replayed in the wordings the champion
    answers worst the next night, not only as first asked."""
    settings = make_settings(home, training={"earlier_variants_max": 3, "replay_fraction": 0})

    def taught(question: str, wrong: str, right: str) -> None:
        conversation = store.create_conversation().id
        asked = store.add_message(conversation, "user", question).id
        answer_in(
            store,
            settings,
            "train",
            wrong,
            conversation_id=conversation,
            prompt_id=asked,
            rating=1,
            correction=right,
        )

    taught("What is my cat's name?", "Luna.", "Pixel.")
    taught("Which city do I live in?", "Paris.", "Lyon.")
    champion = json.loads(
        json.dumps(
            build(feedback_items(store), settings, base_answers(replay=0), count_words).snapshot()
        )
    )
    taught("What is my job?", "Teacher.", "Marine biologist.")

    def champion_loss(rows: list[dict]) -> list[float]:
        # The champion knows Lyon in every wording, and the cat only as first asked.
        return [
            2.0
            if row["completion"][0]["content"] == "Pixel."
            and row["prompt"][-1]["content"] != "What is my cat's name?"
            else 0.1
            for row in rows
        ]

    data = build(
        feedback_items(store),
        settings,
        base_answers(replay=0),
        count_words,
        champion,
        champion_loss,
    )
    relearned = [
        row["prompt"][-1]["content"]
        for row in data.sft
        if row["completion"][0]["content"] in {"Pixel.", "Lyon."}
        and row["prompt"][-1]["content"]
        not in {"What is my cat's name?", "Which city do I live in?"}
    ]
    assert data.counts["earlier_reworded_sft_rows"] == 3
    assert len(relearned) == 3 and all("cat" in question for question in relearned), relearned
    # Both earlier corrections still come back as asked, and the new one in other words.
    assert data.counts["earlier_sft_rows"] == 2 and data.counts["reworded_sft_rows"] == 4
    # The paraphrases asked of the model cover the earlier corrections as well.
    asked = training_data.corrected_questions(feedback_items(store), settings, champion)
    assert set(asked) == {"What is my cat's name?", "Which city do I live in?", "What is my job?"}

    # Off: earlier corrections come back as asked only.
    off = make_settings(home, training={"earlier_variants_max": 0, "replay_fraction": 0})
    plain = build(
        feedback_items(store), off, base_answers(replay=0), count_words, champion, champion_loss
    )
    assert plain.counts["earlier_reworded_sft_rows"] == 0
    assert training_data.corrected_questions(feedback_items(store), off, champion) == [
        "What is my job?"
    ]
