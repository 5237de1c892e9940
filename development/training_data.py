"""What a training run learns from, and what it is judged on, built from the store.

Every feedback item is placed by the number the store gave its answer when it first got
feedback (data/splits.py), so the placement never changes as feedback grows:

    [0, holdout)                      the holdout: the gate judges on it, then it is trained on
    [holdout, holdout + validation)   held-out loss during training (early stopping), then
                                      trained on
    the rest                          trained on

SFT rows are prompt-completion pairs (TRL then puts the loss on the completion only): the
correction if there is one, else an answer rated 4-5. DPO pairs and KTO labels come from
the training items only. Replay rows (the base model's own answers to shipped general
prompts, generated once per base model and cached) are mixed in at `replay_fraction`.
A run that continues the champion replays the earlier rows and base answers the champion
scores worst (`build`'s champion_loss), not a random sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import Settings
from common.fs import atomic_write_text
from data import exports
from data.exports import FeedbackItem
from data.splits import Split, split_items
from data.store import Store

from . import probes, variants

log = logging.getLogger(__name__)

Row = dict[str, Any]
Messages = list[dict[str, str]]
# Counts tokens of (prompt, answer) as the trainer will see them.
TokenCounter = Callable[[Messages, str], int]

# Bump when the way base answers are generated changes: old caches are then regenerated.
REPLAY_VERSION = 2
REPLAY_MAX_NEW_TOKENS = 160
# Earlier person rows a continuing run scores at most to pick its replay (a random sample).
EARLIER_SCORED = 256


def _prompt_completion(messages: Messages, answer: str) -> Row:
    return {
        "prompt": [dict(turn) for turn in messages],
        "completion": [{"role": "assistant", "content": answer}],
    }


def fit_prompt(
    prompt: Messages, answer: str, max_length: int, count: TokenCounter
) -> Messages | None:
    """Drop the oldest turns (never the system prompt or the question answered) until prompt
    and answer fit in max_length tokens; None when even the shortest form does not fit."""
    system = [turn for turn in prompt[:1] if turn["role"] == "system"]
    turns = prompt[len(system) :]
    while True:
        candidate = system + turns
        if count(candidate, answer) <= max_length:
            return candidate
        if len(turns) <= 1:
            return None
        # Drop through the next user turn so the kept context still starts with the user.
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]


def sft_target(item: FeedbackItem) -> str | None:
    """What the person wants this answer to be, if they said so (correction or 4-5)."""
    if item.correction is not None:
        return item.correction
    if item.rating is not None and item.rating >= 4 and item.complete:
        return item.answer
    return None


def teaches(item: FeedbackItem) -> bool:
    """Whether an item can become a training row at all (a rating of 3 alone cannot)."""
    return item.correction is not None or (item.rating is not None and item.rating != 3)


def kto_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) putting desirable*w_d : undesirable*w_u
    between 1:1 and 4:3, as TRL's KTO documentation advises."""
    if desirable == 0 or undesirable == 0:
        return 1.0, 1.0
    ratio = desirable / undesirable
    if ratio < 1:
        return round(1 / ratio, 4), 1.0
    if ratio > 4 / 3:
        return 1.0, round(ratio / (4 / 3), 4)
    return 1.0, 1.0


# --- replay: the base model's own answers, cached per base model --------------------------


def replay_cache_file(settings: Settings) -> Path:
    prompts = {"replay": probes.REPLAY, "validation": probes.VALIDATION}
    prompts["regression"] = probes.REGRESSION
    key = json.dumps(
        {
            "base_model": settings.model.base_model,
            "load_in_4bit": settings.model.load_in_4bit,
            "chat_format": settings.model.chat_format,
            "prompts": prompts,
            "version": REPLAY_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.paths.models_dir / "replay" / f"{digest}.json"


def load_base_answers(
    settings: Settings, generate: Callable[[list[str]], list[tuple[str, bool]]] | None
) -> dict[str, list[dict[str, str]]]:
    """{"replay"|"validation"|"regression": [{"prompt", "answer"}]} from the cache, generated
    with `generate(prompts) -> [(answer, finished)]` when missing. Unfinished answers (cut at
    the token limit) are dropped: training on them would teach answers that stop mid-way."""
    path = replay_cache_file(settings)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            return cached["sets"]
        except (ValueError, KeyError) as exc:
            log.warning("replay cache %s is unreadable (%s); regenerating", path, exc)
    if generate is None:
        raise FileNotFoundError(f"no cached base answers at {path}")
    named = {
        "replay": list(probes.REPLAY),
        "validation": list(probes.VALIDATION),
        "regression": list(probes.REGRESSION),
    }
    # One call for all three sets: generation batches them together (modeling.base_answers).
    answers = generate([prompt for prompts in named.values() for prompt in prompts])
    sets: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name, prompts in named.items():
        own = answers[start : start + len(prompts)]
        start += len(prompts)
        sets[name] = [
            {"prompt": prompt, "answer": text}
            for prompt, (text, finished) in zip(prompts, own, strict=True)
            if finished and text.strip()
        ]
        log.info("base answers for %s: %d of %d finished", name, len(sets[name]), len(prompts))
    body = {"base_model": settings.model.base_model, "sets": sets}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    return sets


# --- the training data of one run --------------------------------------------------------


@dataclass
class TrainingData:
    split: Split
    sft: list[Row]  # prompt-completion rows: the person's targets and replay, shuffled
    validation: list[Row]  # prompt-completion rows for held-out loss
    dpo: list[Row]
    kto: list[Row]
    kto_weights: tuple[float, float]
    regression: list[dict[str, str]]  # {"prompt", "answer"}: general probes for the gate
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # rows too long for max_seq_length

    def snapshot(self) -> dict[str, Any]:
        """What the run saw, for meta.json: ids per split, counts, the feedback time range."""
        items = self.split.train + self.split.validation + self.split.holdout
        times = sorted(item.created_at for item in items)
        return {
            "feedback_high_water": _iso(times[-1]) if times else None,
            "first_feedback_at": _iso(times[0]) if times else None,
            "last_feedback_at": _iso(times[-1]) if times else None,
            "counts": dict(self.counts),
            "dropped_too_long": dict(self.dropped),
            "message_ids": {
                "train": [item.message_id for item in self.split.train],
                "validation": [item.message_id for item in self.split.validation],
                "holdout": [item.message_id for item in self.split.holdout],
            },
        }


def _iso(when: datetime) -> str:
    return when.isoformat()


def build(
    items: Sequence[FeedbackItem],
    settings: Settings,
    base_answers: dict[str, list[dict[str, str]]],
    count: TokenCounter,
    champion_snapshot: dict[str, Any] | None = None,
    champion_loss: Callable[[list[Row]], list[float]] | None = None,
    paraphrases: dict[str, list[str]] | None = None,
) -> TrainingData:
    """All rows of one run from the feedback items (see the module docstring). With the
    champion's data snapshot (a run that continues the champion's adapter), the person's SFT
    rows are everything new since the champion plus `training.earlier_rows_per_new` earlier
    rows per new one: the champion already learned most of the earlier ones. With
    `champion_loss` (the champion's per-token loss on each row) the earlier rows and the
    base-answer replay rows are those it knows least, else random samples. Each new
    correction also gets up to `training.correction_variants` rows asking its question in
    other words (development/variants.py; `paraphrases` are the model's, by question); of the
    earlier corrections' other wordings, the `training.earlier_variants_max` the champion
    knows least come back."""
    training = settings.training
    split = split_items(items, training.holdout_fraction, training.validation_fraction)
    max_length = settings.model.max_seq_length
    scored = 0  # rows the champion scored to pick from
    if champion_snapshot is None:
        champion_loss = None  # a fresh adapter: there is no champion to ask

    def least_known(rows: list[Row], wanted: int, *, among: int | None = None) -> list[Row]:
        # `wanted` of `rows` (shuffled): those the champion scores worst, when it is asked.
        # Random picks stop doing their job as continued nights add up. Measured over a
        # simulated week (embedded model, seed 0), rerunning night 7 from day 5's champion:
        # a fact lost to a rollback stayed lost with random earlier rows (0/2 probes) and
        # came back with the worst-scored ones (2/2); the 30 replay answers, drawn every
        # night, had fallen from 0.66 to 0.03 NLL per token, anchored nothing, and the
        # general probes' NLL rose 18-20% over the base. `among` bounds how many of the
        # (shuffled) rows are scored: scoring is a forward pass over each, and time a night
        # spends scoring is time the person waits for the cycle.
        nonlocal scored
        if among is not None:
            rows = rows[:among]
        if champion_loss is None or wanted >= len(rows):
            return rows[:wanted]
        scored += len(rows)
        losses = champion_loss(rows)
        order = sorted(range(len(rows)), key=lambda i: -losses[i])
        return [rows[i] for i in order[:wanted]]

    dropped = {"sft": 0, "dpo": 0, "kto": 0}

    def fitted(prompt: Messages, *answers: str) -> Messages | None:
        # A pair must fit with either answer: measure both, in tokens.
        def longest(turns: Messages, _answer: str) -> int:
            return max(count(turns, answer) for answer in answers)

        return fit_prompt(prompt, answers[0], max_length, longest)

    person, earlier, earlier_corrections, reworded, earlier_reworded = [], [], [], [], []
    is_new = _new_since(champion_snapshot)
    for item in split.train:
        target = sft_target(item)
        if target is None:
            continue
        prompt = fitted(item.context, target)
        if prompt is None:
            dropped["sft"] += 1
            continue
        row = _prompt_completion(prompt, target)
        if is_new(item):
            person.append(row)
        else:
            (earlier if item.correction is None else earlier_corrections).append(row)
        if item.correction is not None:
            rows = _reworded(prompt, target, paraphrases or {}, training.correction_variants)
            (reworded if is_new(item) else earlier_reworded).extend(rows)
    rng = random.Random(training.seed)
    relearned: list[Row] = []
    if champion_snapshot is None:
        earlier_rows = 0
    else:
        rng.shuffle(earlier)
        rng.shuffle(earlier_corrections)
        rng.shuffle(earlier_reworded)
        wanted = round(len(person) * training.earlier_rows_per_new)
        # Every earlier correction comes back (the least known, past the bound): the facts
        # the person taught are what a night must not lose. Picked by what the champion
        # knows least, a fact it knew was never replayed: the week taught once (seed 0)
        # recalled 12/12 probes on day 4, and day 5's night, training two new facts on 5
        # earlier rows of 30, lost two of the six it knew (8/12).
        # With nothing new there is nothing to keep them in place against (a forced run then
        # retrains on all feedback: train.py).
        kept = (
            least_known(
                earlier_corrections,
                training.earlier_corrections_max,
                among=max(EARLIER_SCORED, 2 * training.earlier_corrections_max),
            )
            if person
            else []
        )
        # Scoring every earlier row would make a night's cost grow with the whole history
        # (person rows are short: 0.03 s each on the embedded model, two cores). A week
        # never reaches the bound; one at 4x wanted changed which rows a week's night 6
        # replayed, and its day 7 recalled 16/20 facts instead of 20/20.
        others = max(0, wanted - len(kept))
        earlier = kept + least_known(earlier, others, among=max(EARLIER_SCORED, 2 * others))
        earlier_rows = len(earlier)
        # The earlier corrections the champion answers worst in other words, in those words:
        # a fact it knows only as first asked is not yet learned.
        if person and training.earlier_variants_max:
            relearned = least_known(
                earlier_reworded,
                training.earlier_variants_max,
                among=max(EARLIER_SCORED, 2 * training.earlier_variants_max),
            )
    person += earlier + relearned + reworded

    validation = []
    for item in split.validation:
        target = sft_target(item)
        prompt = None if target is None else fitted(item.context, target)
        if prompt is not None and target is not None:
            validation.append(_prompt_completion(prompt, target))
    person_validation = len(validation)  # the person's rows first, then the general ones
    validation += [
        _prompt_completion([{"role": "user", "content": pair["prompt"]}], pair["answer"])
        for pair in base_answers.get("validation", [])
    ]

    # Replay share r of all SFT rows: replay = person * r / (1 - r), capped by what exists.
    replay_pool = list(base_answers.get("replay", []))
    rng.shuffle(replay_pool)
    fraction = training.replay_fraction
    wanted = round(len(person) * fraction / (1 - fraction)) if person else 0
    replay = [
        _prompt_completion([{"role": "user", "content": pair["prompt"]}], pair["answer"])
        for pair in replay_pool
    ]
    # The base answers are the long rows: the worst-known half of a random sample twice the
    # size needed is enough to find the drifted ones (all 91 cost a third of a night's
    # non-training time on the embedded model, two cores).
    replay = least_known(replay, wanted, among=2 * wanted)
    sft = person + replay
    rng.shuffle(sft)

    train_ids = {item.message_id for item in split.train}
    dpo = []
    for row, ids in exports.dpo_rows_with_ids(split.train):
        if not set(ids) <= train_ids:
            continue
        prompt = fitted(row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        if prompt is None:
            dropped["dpo"] += 1
            continue
        dpo.append({**row, "prompt": prompt})

    kto = []
    for row, _ids in exports.kto_rows_with_ids(split.train):
        prompt = fitted(row["prompt"], row["completion"][0]["content"])
        if prompt is None:
            dropped["kto"] += 1
            continue
        kto.append({**row, "prompt": prompt})
    desirable = sum(1 for row in kto if row["label"])
    weights = kto_weights(desirable, len(kto) - desirable)

    counts = {
        "feedback_items": len(items),
        "train_items": len(split.train),
        "validation_items": len(split.validation),
        "holdout_items": len(split.holdout),
        "sft_rows": len(person),
        "earlier_sft_rows": earlier_rows,
        "reworded_sft_rows": len(reworded),
        "earlier_reworded_sft_rows": len(relearned),
        "replay_rows": len(replay),
        "scored_by_champion": scored,
        "validation_rows": len(validation),
        "validation_person_rows": person_validation,
        "dpo_rows": len(dpo),
        "kto_rows": len(kto),
        "kto_desirable": desirable,
        "kto_undesirable": len(kto) - desirable,
    }
    return TrainingData(
        split=split,
        sft=sft,
        validation=validation,
        dpo=dpo,
        kto=kto,
        kto_weights=weights,
        regression=list(base_answers.get("regression", [])),
        counts=counts,
        dropped={k: v for k, v in dropped.items() if v},
    )


def _reworded(
    prompt: Messages, target: str, paraphrases: dict[str, list[str]], count: int
) -> list[Row]:
    """Rows asking the corrected question in other words, with the same answer."""
    question = prompt[-1]["content"]
    return [
        _prompt_completion([*prompt[:-1], {**prompt[-1], "content": wording}], target)
        for wording in variants.variants(question, paraphrases.get(question, []), count)
    ]


def corrected_questions(
    items: Sequence[FeedbackItem],
    settings: Settings,
    champion_snapshot: dict[str, Any] | None = None,
) -> list[str]:
    """The questions of the corrections a run trains on: what the model paraphrases. When it
    continues the champion, the earlier corrections too if `training.earlier_variants_max`
    (build() rewords those the champion knows least); else only the new ones."""
    if settings.training.correction_variants == 0:
        return []
    split = split_items(
        items, settings.training.holdout_fraction, settings.training.validation_fraction
    )
    is_new = _new_since(champion_snapshot)
    every = settings.training.earlier_variants_max > 0
    return [
        item.context[-1]["content"]
        for item in split.train
        if item.correction is not None and (every or is_new(item))
    ]


# --- is a run worth starting? -------------------------------------------------------------


def released_corrections(
    store: Store, settings: Settings, champion_snapshot: dict[str, Any]
) -> int:
    """Corrections in the training split the champion never trained on: after a promotion,
    the ones its gate just judged and released from the holdout (what a catch-up run learns)."""
    split = split_items(
        exports.feedback_items(store),
        settings.training.holdout_fraction,
        settings.training.validation_fraction,
    )
    is_new = _new_since(champion_snapshot)
    return sum(1 for item in split.train if item.correction is not None and is_new(item))


def taught_in(
    items: Sequence[FeedbackItem],
    snapshot: dict[str, Any],
    champion_snapshot: dict[str, Any] | None,
) -> list[FeedbackItem]:
    """The corrections a candidate's run (its data `snapshot`) trained on that its champion
    never had: what the person taught since the adapter serving now."""
    trained = set(snapshot.get("message_ids", {}).get("train", []))
    is_new = _new_since(champion_snapshot)
    return [
        item
        for item in items
        if item.correction is not None and item.message_id in trained and is_new(item)
    ]


def _new_since(champion_snapshot: dict[str, Any] | None) -> Callable[[FeedbackItem], bool]:
    """Whether an item is new to the champion: never in its training split (its validation
    and holdout items are trained on once a gate judged it: the rolling holdout), or its
    feedback changed after the champion's data was taken (a later correction)."""
    if not champion_snapshot:
        return lambda item: True
    seen = set(champion_snapshot.get("message_ids", {}).get("train", []))
    mark = champion_snapshot.get("feedback_high_water")
    high_water = datetime.fromisoformat(mark) if mark else None
    return lambda item: (
        item.message_id not in seen or (high_water is not None and item.created_at > high_water)
    )


@dataclass(frozen=True)
class Sufficiency:
    enough: bool
    new_items: int
    reason: str


def sufficiency(
    store: Store, settings: Settings, champion_snapshot: dict[str, Any] | None
) -> Sufficiency:
    """Enough new trainable feedback since the champion's data snapshot to be worth a run?
    schedule.min_new_examples new items, or any new correction. Holdout items are new data
    too, but a run cannot learn from them, so they do not count."""
    items = exports.feedback_items(store)
    split = split_items(
        items, settings.training.holdout_fraction, settings.training.validation_fraction
    )
    # New: never seen by the champion, or its feedback changed since (a later correction);
    # and it teaches something (a rating of 3 without a correction gives no row).
    is_new = _new_since(champion_snapshot)
    new = [item for item in split.train + split.validation if teaches(item) and is_new(item)]
    learnable = [item for item in split.train if sft_target(item) is not None]
    needed = settings.schedule.min_new_examples
    if not learnable:
        return Sufficiency(
            False,
            len(new),
            "no feedback to learn from yet: rate answers you like 4-5 or correct wrong ones, "
            "then train again",
        )
    train_ids = {item.message_id for item in split.train}
    corrections = sum(1 for i in new if i.correction is not None and i.message_id in train_ids)
    # A correction held out for the gate is learned the same night too: tonight's gate judges
    # it and, once the candidate is promoted, the catch-up trains on it (training.catch_up).
    # Skipped, it waited for a run to judge it (the week taught once, seed 0, 2026-12-07:
    # night 6's one correction was held out and the night skipped on 7 new items).
    held_out = (
        sum(1 for i in split.holdout if i.correction is not None and is_new(i))
        if settings.training.catch_up and new
        else 0
    )
    if len(new) < needed and (corrections or held_out):
        # A correction is the person teaching a fact; left to wait for more ratings, a fact
        # taught on a quiet day was not learned that night (the week taught once, seed 0:
        # night 6 skipped with one correction among 6 new items, and day 7 missed it).
        judged = (
            f"; {held_out} held out for tonight's gate, then trained by the catch-up"
            if held_out
            else ""
        )
        return Sufficiency(
            True,
            len(new),
            f"{len(new)} new feedback item(s), {corrections} of them correction(s){judged}: "
            "a correction is trained on the night it is made",
        )
    if len(new) < needed:
        since = "since the champion was trained" if champion_snapshot else "in total"
        # A fifth of new feedback goes to the holdout first (data/splits.py).
        more = math.ceil((needed - len(new)) / (1 - settings.training.holdout_fraction))
        return Sufficiency(
            False,
            len(new),
            f"{len(new)} new feedback item(s) {since}; schedule.min_new_examples is {needed}: "
            f"rate or correct about {more} more answer(s), or train anyway with "
            "`whetstone train --force`",
        )
    return Sufficiency(True, len(new), f"{len(new)} new feedback item(s)")
