"""Months of use: does a night's cycle grow with the history? (issue 38, item 1)

    python -m benchmarks.history [--days 7 30 90 180] [--seed 0] [--home DIR] [--set K=V ...]

A fresh home (the week benchmark's config, the embedded model linked from the tests' cache)
is filled day by day through the store's own API, without the model answering: each day the
person has CONVERSATIONS_PER_DAY conversations of 1-3 questions, rates most answers by the
week's taste (benchmarks/week_person.py), and corrects three: a new personal fact taught (the
wrong answer rated 1, then corrected, the TUI's order), an earlier fact asked again and
corrected again, and an everyday answer corrected to a shorter one. Answers are the base
model's own replay answers (their real lengths), so a day's rows are as long as a real day's.

For each day D of --days, the history up to day D-1 is trained on by one night (not measured:
it stands for the nights between, so day D's night starts from a champion as a real one
would; refused by the gate, its candidate is promoted by hand, `whetstone promote --force`),
then day D is filled and its night measured: `whetstone train --wait` with no profile,
as the README's nightly run trains on the CPU (quick_test), its catch-up run included. One
entry per day records the cycle's wall time, each run's stages (SFT, evaluation), peak host
memory, rows of each kind, the items the gate judged, and the database's size.

Goals (issue 38), on the embedded model on two cores: day 180's cycle at most 1.5x day 7's,
its peak memory at most 1.2x. Writes benchmarks/results/history-<host>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import week_person as person
from benchmarks.first_hour import whetstone
from benchmarks.week import RESULTS_DIR, check_sets, cycle, prepare_home
from common.config import Settings, load_settings
from common.fs import atomic_write_text
from data.store import Store
from development import training_data

log = logging.getLogger("benchmarks.history")

CONVERSATIONS_PER_DAY = 12
RATED_SHARE = 0.6  # of the everyday answers: the person rates most, not all
DAYS = (7, 30, 90, 180)
GOALS = {"cycle_ratio_max": 1.5, "peak_memory_ratio_max": 1.2}

# Personal facts: a relation and a context make a question; one new fact a day.
RELATIONS = (
    "cousin", "neighbour", "colleague", "dentist", "landlord", "teacher", "coach", "doctor",
    "best friend", "piano teacher", "manager", "barber", "nephew", "niece", "godmother",
    "flatmate", "tutor", "mechanic", "vet", "accountant",
)  # fmt: skip
CONTEXTS = (
    "", " at work", " from school", " in Lyon", " from the gym", " at the club",
    " from university", " in the village", " from the choir", " next door",
)  # fmt: skip
NAMES = (
    "Ines", "Marta", "Tomas", "Yuki", "Amara", "Olek", "Priya", "Luca", "Noor", "Sven",
    "Hana", "Diego", "Freya", "Kofi", "Mei", "Ravi", "Zofia", "Emil", "Lena", "Omar",
)  # fmt: skip


def fact(index: int, rng: random.Random) -> tuple[str, str]:
    """The index-th personal fact: (question, the person's answer)."""
    relation = RELATIONS[index % len(RELATIONS)]
    context = CONTEXTS[(index // len(RELATIONS)) % len(CONTEXTS)]
    name = rng.choice(NAMES)
    return f"What is the name of my {relation}{context}?", f"Your {relation}{context} is {name}."


class Person:
    """The simulated person's days, written through the store as the API writes them."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.rng = random.Random(seed)
        answers = training_data.load_base_answers(settings, None)
        pairs = answers["replay"] + answers.get("validation", [])
        self.prompts = list(person.CHAT_PROMPTS) + [pair["prompt"] for pair in pairs]
        self.answers = [pair["answer"] for pair in pairs]
        self.facts: list[tuple[str, str]] = []
        self.day = 0
        self.counts = {"conversations": 0, "answers": 0, "rated": 0, "corrected": 0}

    def _ask(self, store: Store, conversation: str, question: str, answer: str) -> str:
        store.add_message(conversation, "user", question)
        words = len(answer.split())
        reply = store.add_message(
            conversation,
            "assistant",
            answer,
            finish_reason="stop",
            prompt_tokens=20 + 30 * self.rng.randint(0, 2),
            completion_tokens=round(words * 1.3),
            ttft_ms=self.rng.uniform(150, 400),
            latency_ms=self.rng.uniform(2_000, 8_000),
        )
        self.counts["answers"] += 1
        return reply.id

    def _correct(self, store: Store, question: str, wrong: str, correction: str) -> None:
        conversation = store.create_conversation(title=question)
        self.counts["conversations"] += 1
        message = self._ask(store, conversation.id, question, wrong)
        store.add_feedback(message, rating=1)  # the stars first, then `c` (two requests)
        store.add_feedback(message, correction=correction)
        self.counts["rated"] += 1
        self.counts["corrected"] += 1

    def live_a_day(self, store: Store) -> None:
        self.day += 1
        rng = self.rng
        for _ in range(CONVERSATIONS_PER_DAY):
            conversation = store.create_conversation()
            self.counts["conversations"] += 1
            for _ in range(rng.randint(1, 3)):
                answer = rng.choice(self.answers)
                message = self._ask(store, conversation.id, rng.choice(self.prompts), answer)
                if rng.random() < RATED_SHARE:
                    store.add_feedback(message, rating=person.rating(answer, True, rng))
                    self.counts["rated"] += 1
        # Three corrections a day: a new fact, an earlier one asked again, a shorter answer.
        new = fact(len(self.facts), rng)
        self.facts.append(new)
        self._correct(store, new[0], "I'm sorry, I don't know that.", new[1])
        earlier = rng.choice(self.facts)
        self._correct(store, earlier[0], "I don't have personal information.", earlier[1])
        prompt = rng.choice(person.CHAT_PROMPTS)
        long_answer = max(rng.sample(self.answers, 3), key=len)
        self._correct(store, prompt, long_answer, " ".join(long_answer.split()[:12]))

    def live_until(self, day: int) -> None:
        with Store(self.settings.db_url) as store:
            while self.day < day:
                self.live_a_day(store)


def database_mib(settings: Settings) -> float:
    path = settings.paths.db_file
    files = [path, path.with_name(path.name + "-wal")]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 2)


def night(home: Path, settings: Settings) -> dict[str, Any]:
    """`whetstone train --wait` with no profile: (the cycle's wall, every run it carried out)."""
    since = datetime.now(UTC)
    code, output, wall = whetstone(home, "train", "--wait", timeout=3600)
    if code != 0:
        log.warning("whetstone train exited %d:\n%s", code, output[-3000:])
    with Store(settings.db_url) as store:
        ids = [r.id for r in reversed(store.list_runs(limit=20)) if r.created_at >= since]
    runs = [cycle(settings, run_id) for run_id in ids]
    return {"exit": code, "cycle_s": wall, "runs": runs, "output": output[-1500:]}


def promote_last(home: Path, night_result: dict[str, Any]) -> str | None:
    """The night before a measured day stands for the nights between, which promote as the
    gate lets them; one refused would leave the measured night continuing an older champion
    on many days of new feedback (a night no person has after a normal day). Its candidate is
    promoted by hand then, `whetstone promote --force`, as the person could; returns its id."""
    if any(r.get("decision") == "promote" for r in night_result["runs"]):
        return None  # a refused catch-up leaves its run's promotion standing
    last = next((r for r in reversed(night_result["runs"]) if r.get("candidate")), None)
    if last is None:
        return None
    code, output, _ = whetstone(home, "promote", last["candidate"], "--force")
    if code != 0:
        raise RuntimeError(f"whetstone promote {last['candidate']} --force failed:\n{output}")
    return str(last["candidate"])


def run(home: Path, days: list[int], seed: int, sets: list[str]) -> dict[str, Any]:
    prepare_home(home, fresh=False, sets=sets)
    settings = load_settings(home)
    settings.paths.create()
    with Store(settings.db_url):
        pass  # the schema, before the person's first day
    who = Person(settings, seed)
    result: dict[str, Any] = {
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "config": (home / "config.toml").read_text(),
        "rates": {
            "conversations_per_day": CONVERSATIONS_PER_DAY,
            "rated_share": RATED_SHARE,
            "corrections_per_day": 3,
        },
        "goals": GOALS,
        "days": [],
    }
    for day in days:
        if who.day < day - 1:
            began = time.monotonic()
            who.live_until(day - 1)
            filled = round(time.monotonic() - began, 1)
            log.info("day %d: filled in %.1f s; the night before (not measured)", day - 1, filled)
            before = night(home, settings)
            before["forced"] = promote_last(home, before)
            result["days"].append({"day": day - 1, "measured": False, **before})
        who.live_until(day)
        log.info("day %d: %s; its night", day, who.counts)
        measured = night(home, settings)
        entry = {
            "day": day,
            "measured": True,
            "history": dict(who.counts),
            "facts_taught": len(who.facts),
            "database_mib": database_mib(settings),
            **measured,
        }
        result["days"].append(entry)
        log.info("day %d: cycle %.1f s, %s", day, measured["cycle_s"], _line(measured))
    result["summary"] = summarize(result["days"])
    return result


def _line(night_result: dict[str, Any]) -> str:
    return "; ".join(
        f"{r['trigger']} {r['status']} {r.get('wall_s')} s, peak {r.get('peak_host_gib')} GiB"
        for r in night_result["runs"]
    )


def summarize(days: list[dict[str, Any]]) -> dict[str, Any]:
    """Per measured day: the cycle (every run of the night: a promotion adds a catch-up, a
    refusal does not), the night's own run alone (what compares across days whatever the
    gate decided), peak memory, rows and the database's size; ratios of the last day to the
    first."""
    measured = [d for d in days if d["measured"]]
    rows = []
    for d in measured:
        peaks = [r.get("peak_host_gib") for r in d["runs"] if r.get("peak_host_gib")]
        rows.append(
            {
                "day": d["day"],
                "cycle_s": d["cycle_s"],
                "night_run_s": d["runs"][0]["wall_s"] if d["runs"] else None,
                "runs": [f"{r['trigger']}:{r['status']}:{r.get('decision')}" for r in d["runs"]],
                "peak_host_gib": max(peaks) if peaks else None,
                "feedback_items": d["runs"][0]["rows"]["feedback_items"] if d["runs"] else None,
                "database_mib": d["database_mib"],
            }
        )
    summary: dict[str, Any] = {"days": rows}
    if len(rows) >= 2 and rows[0]["cycle_s"] and rows[-1]["cycle_s"]:
        summary["cycle_ratio"] = round(rows[-1]["cycle_s"] / rows[0]["cycle_s"], 2)
        if rows[0]["night_run_s"] and rows[-1]["night_run_s"]:
            ratio = rows[-1]["night_run_s"] / rows[0]["night_run_s"]
            summary["night_run_ratio"] = round(ratio, 2)
        if rows[0]["peak_host_gib"] and rows[-1]["peak_host_gib"]:
            ratio = rows[-1]["peak_host_gib"] / rows[0]["peak_host_gib"]
            summary["peak_memory_ratio"] = round(ratio, 2)
        summary["goals_met"] = (
            max(summary["cycle_ratio"], summary.get("night_run_ratio", 0))
            <= GOALS["cycle_ratio_max"]
            and summary.get("peak_memory_ratio", 99) <= GOALS["peak_memory_ratio_max"]
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, nargs="+", default=list(DAYS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=None, help="keep the home here")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    check_sets(parser, args.sets)
    if sorted(args.days) != args.days or args.days[0] < 2:
        parser.error("--days must be increasing and at least 2 (a night comes before each)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="whetstone-history-") as scratch:
        home = args.home or Path(scratch) / "home"
        result = run(home, args.days, args.seed, args.sets)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"history-{platform.node()}-{stamp}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
