"""A newcomer's first hour: each personal fact taught once, in the order the chat invites,
then `whetstone train --wait` with the defaults. Does whetstone learn?

    python -m benchmarks.first_hour [--seed 0] [--home DIR] [--fresh] [--set KEY=VALUE ...]

A real `whetstone up` on the embedded model in a fresh home with the default config, driven
only as the TUI and the README drive it:

- six personal facts, each taught **once**: the person asks the question, reads a wrong
  answer, rates it 1 (one request, the TUI's stars) and then corrects it (a second request,
  the TUI's `c`), in their own words;
- a dozen everyday questions, each answered and rated by the person's taste (short and direct
  is good), interleaved with the facts in a random order;
- then `whetstone train --wait` with no profile (queued with the daemon, as the README says);
- the next morning: `whetstone report` of the serving candidate, one more answer rated, and
  `whetstone trend --json`, which files that answer under the adapter that gave it.

Measured before and after: recall of each fact on two paraphrases never asked while teaching
(a fact is recalled when both say its keyword), 28 general questions (the simulated week's 12
and 16 more, benchmarks/week_person.py), the serving adapter, the run's decision and the
cycle's wall time (`whetstone train --wait` from start to exit). The probes' conversations are
deleted after, so nothing measured is ever trained on.

Goals on a 2-core machine: the run trains, is gated and promoted; at least 5 of 6 facts
recalled; at most one general question lost of those the base answers right with a margin
(every token up to the keyword ahead of the next by benchmarks.week.TIE_NATS, measured after
the daemon stops; the net change over all 28 is reported beside); the cycle under 5 minutes.
--seed picks the facts' order, the wordings and the everyday questions. Writes
benchmarks/results/first-hour-<host>-seed<N>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import week_person as person
from benchmarks.week import (
    REPO,
    RESULTS_DIR,
    Daemon,
    base_margins,
    check_sets,
    current_adapter,
    cycle,
    lost_with_margin,
    missed_general,
    prepare_home,
    wait_until,
)
from common.config import load_settings
from common.fs import atomic_write_text
from data.store import Store

log = logging.getLogger("benchmarks.first_hour")

# The newcomer keeps the defaults: nothing in the config but what --set adds.
CONFIG = ""
FACTS_TAUGHT = 6
CHATS = 12
# The week's 12 general questions and 16 more (benchmarks/week_person.py).
GENERAL_QUESTIONS = person.KNOWLEDGE + person.MORE_KNOWLEDGE
GOALS = {"recalled_at_least": 5, "knowledge_lost_at_most": 1, "cycle_s_at_most": 300}


@dataclass(frozen=True)
class Fact:
    keyword: str  # recalled when an answer says it (case-insensitive)
    question: str  # asked once while teaching
    corrections: tuple[str, ...]  # what the person may type, one of them, once
    probes: tuple[str, str]  # asked only to measure recall, never while teaching


# Facts of the kind a newcomer teaches first (the three the issue quotes among them), none of
# them in the scripted person of the tests or the week.
FACTS: tuple[Fact, ...] = (
    Fact(
        "pixel",
        "What is my cat's name?",
        ("Your cat is called Pixel.", "My cat's name is Pixel."),
        ("Remind me, what did I name my cat?", "What do I call my cat?"),
    ),
    Fact(
        "ramen",
        "What is my favourite food?",
        ("Your favourite food is ramen.", "Ramen is my favourite food."),
        ("Which dish do I love the most?", "What food do I like best?"),
    ),
    Fact(
        "lyon",
        "Which city do I live in?",
        ("You live in Lyon.", "I live in Lyon, in France."),
        ("Where is my home?", "Remind me where I live."),
    ),
    Fact(
        "nurse",
        "What is my job?",
        ("You work as a nurse.", "I am a nurse."),
        ("What do I do for a living?", "What is my profession?"),
    ),
    Fact(
        "tennis",
        "Which sport do I play?",
        ("You play tennis.", "I play tennis every weekend."),
        ("What sport am I into?", "Remind me which sport I play."),
    ),
    Fact(
        "ines",
        "What is my sister's name?",
        ("Your sister is called Ines.", "My sister's name is Ines."),
        ("Who is my sister?", "Remind me of my sister's name."),
    ),
    Fact(
        "kiwi",
        "What fruit do I eat every morning?",
        ("You eat a kiwi every morning.", "A kiwi, every morning."),
        ("Which fruit do I have for breakfast?", "Remind me what fruit I eat each morning."),
    ),
    Fact(
        "blue",
        "What colour is my bike?",
        ("Your bike is blue.", "My bike is blue."),
        ("Which colour is my bicycle?", "Remind me of the colour of my bike."),
    ),
)


def recall(daemon: Daemon, facts: list[Fact]) -> dict[str, Any]:
    """Each fact's two probes, greedy, answers up to 32 tokens; the conversations deleted."""
    per_fact, said = {}, {}
    for fact in facts:
        answers = []
        for probe in fact.probes:
            _, conversation, text, _ = daemon.ask(probe, 32)
            daemon.forget(conversation)
            answers.append(text)
        hits = sum(fact.keyword in text.lower() for text in answers)
        per_fact[fact.keyword] = f"{hits}/{len(answers)}"
        said[fact.keyword] = answers
    recalled = sum(v == "2/2" for v in per_fact.values())
    probes = sum(int(v.split("/")[0]) for v in per_fact.values())
    return {
        "facts": recalled,
        "of": len(facts),
        "probes": probes,
        "per_fact": per_fact,
        "said": said,
    }


def knowledge(daemon: Daemon) -> dict[str, Any]:
    def ask(question: str) -> str:
        _, conversation, text, _ = daemon.ask(question, 96)
        daemon.forget(conversation)
        return text

    missed = missed_general(GENERAL_QUESTIONS, ask)
    return {
        "right": len(GENERAL_QUESTIONS) - len(missed),
        "of": len(GENERAL_QUESTIONS),
        "missed": missed,
    }


def teach(daemon: Daemon, fact: Fact, rng: random.Random) -> dict[str, Any]:
    """Ask once; rate the answer (1 if it lacks the fact, else 5); then correct a wrong one:
    two requests, as the TUI sends them."""
    message_id, _, text, _ = daemon.ask(fact.question, 64)
    if fact.keyword in text.lower():
        daemon.feedback(message_id, rating=5)
        return {"fact": fact.keyword, "answer": text, "corrected": None}
    daemon.feedback(message_id, rating=1)
    correction = rng.choice(fact.corrections)
    daemon.http.post(
        "/v1/feedback", json={"message_id": message_id, "correction": correction}
    ).raise_for_status()
    return {"fact": fact.keyword, "answer": text, "corrected": correction}


def whetstone(home: Path, *args: str, timeout: float = 600) -> tuple[int, str, float]:
    """One `whetstone` command as the person types it, its output piped (80 columns, as
    `| tee log`): (exit code, output, wall s)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--home", str(home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr, round(time.monotonic() - started, 1)


def train_wait(home: Path) -> tuple[float, str]:
    """`whetstone train --wait` with no profile, as the README says; (wall s, its output)."""
    code, output, wall = whetstone(home, "train", "--wait", timeout=3600)
    output = output[-4000:]
    if code != 0:
        log.warning("whetstone train exited %d:\n%s", code, output)
    return wall, output


def review(daemon: Daemon, home: Path, adapter: str | None) -> dict[str, Any]:
    """The next morning, as the README says: the serving candidate's report, then one more
    answer rated and `whetstone trend`, which must file it under the adapter that gave it."""
    found: dict[str, Any] = {}
    if adapter is not None:
        code, output, wall = whetstone(home, "report", adapter)
        # The report's "What you taught" count, a paragraph Rich wraps at the width.
        paragraph = output.partition("Asked again")[2].partition("\n\n")[0]
        taught = " ".join(("Asked again" + paragraph).split()) if paragraph else None
        found["report"] = {"exit": code, "wall_s": wall, "taught_line": taught}
    message_id, conversation, _, _ = daemon.ask("What is a good way to start the day?", 48)
    daemon.feedback(message_id, rating=4)
    code, output, wall = whetstone(home, "trend", "--json")
    days = json.loads(output)["days"] if code == 0 else []
    served = [row for row in days if row["adapter_id"] == adapter]
    found["trend"] = {
        "exit": code,
        "wall_s": wall,
        "adapters_today": sorted(str(row["adapter_id"]) for row in days),
        "answers_under_serving_adapter": sum(row["answers"] for row in served),
    }
    daemon.forget(conversation)
    return found


def run(home: Path, *, seed: int = 0, fresh: bool = False, sets: list[str] | None = None) -> dict:
    rng = random.Random(seed)
    facts = rng.sample(FACTS, FACTS_TAUGHT)
    chats = rng.sample(person.CHAT_PROMPTS, CHATS)
    steps: list[tuple[str, Any]] = [("fact", f) for f in facts] + [("chat", c) for c in chats]
    rng.shuffle(steps)
    setup = prepare_home(home, fresh, sets or [], base_config=CONFIG)
    settings = load_settings(home)
    started = time.monotonic()
    daemon = Daemon(home)
    result: dict[str, Any] = {
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "fresh_home": fresh,
        "config": (home / "config.toml").read_text(),
        "setup": setup,
        "goals": GOALS,
    }
    try:
        daemon.wait_ready()
        setup["daemon_ready_s"] = round(time.monotonic() - started, 1)
        daemon.ask("Hello!", 32)  # the person's first message, as the TUI sends it
        # From `make run`'s doctor (fresh) or the daemon's start to the first answer.
        setup["first_answer_s"] = round(setup.get("doctor_s", 0) + time.monotonic() - started, 1)
        result["before"] = {"recall": recall(daemon, facts), "knowledge": knowledge(daemon)}
        taught, ratings = [], []
        began = time.monotonic()
        for kind, what in steps:
            if kind == "fact":
                taught.append(teach(daemon, what, rng))
            else:
                message_id, _, text, finished = daemon.ask(what, 160)
                score = person.rating(text, finished, rng)
                daemon.feedback(message_id, rating=score)
                ratings.append(score)
        result["taught"] = taught
        result["ratings"] = ratings
        result["chat_s"] = round(time.monotonic() - began, 1)
        since = datetime.now(UTC)
        result["cycle_s"], result["train_output"] = train_wait(home)
        with Store(settings.db_url) as store:
            runs = [r for r in store.list_runs(limit=10) if r.created_at >= since]
        result["runs"] = [cycle(settings, r.id) for r in reversed(runs)]
        adapter = current_adapter(settings)
        wait_until(lambda: daemon.adapter() == adapter, f"{adapter} served", 120)
        result["adapter"] = adapter
        result["after"] = {"recall": recall(daemon, facts), "knowledge": knowledge(daemon)}
        result["review"] = review(daemon, home, adapter)
    finally:
        daemon.stop()
    result["wall_s"] = round(time.monotonic() - started, 1)
    # After the daemon is gone: the base's margins take a minute of decoding of their own.
    result["base_margins"] = base_margins(settings, GENERAL_QUESTIONS)
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    before, after = result["before"], result["after"]
    run = result["runs"][-1] if result["runs"] else {}
    # The goal counts the questions the base knows with a margin (benchmarks.week.TIE_NATS):
    # a coin flip the adapter lands the other way is no knowledge lost.
    lost = lost_with_margin(result["base_margins"], after["knowledge"]["missed"])
    summary = {
        "run": ":".join(str(run.get(k) or "-") for k in ("status", "decision", "rule")),
        "reason": run.get("reason"),
        "promoted": result["adapter"] is not None,
        "recalled_before": before["recall"]["facts"],
        "recalled": after["recall"]["facts"],
        "probes_right": f"{after['recall']['probes']}/{2 * after['recall']['of']}",
        "knowledge": [before["knowledge"]["right"], after["knowledge"]["right"]],
        "knowledge_lost": before["knowledge"]["right"] - after["knowledge"]["right"],
        "known_with_margin": sum(m["knows"] for m in result["base_margins"].values()),
        "lost_with_margin": lost,
        "cycle_s": result["cycle_s"],
        "corrections": sum(1 for t in result["taught"] if t["corrected"]),
        "report_taught": (result.get("review", {}).get("report") or {}).get("taught_line"),
        "trend_under_adapter": result.get("review", {})
        .get("trend", {})
        .get("answers_under_serving_adapter"),
    }
    summary["goals_met"] = (
        summary["promoted"]
        and summary["recalled"] >= GOALS["recalled_at_least"]
        and len(lost) <= GOALS["knowledge_lost_at_most"]
        and result["cycle_s"] <= GOALS["cycle_s_at_most"]
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=None, help="keep the home here")
    parser.add_argument("--fresh", action="store_true", help="run `whetstone doctor` first")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    check_sets(parser, args.sets)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"first-hour-{platform.node()}-seed{args.seed}-{stamp}.json"
    with tempfile.TemporaryDirectory(prefix="whetstone-first-hour-") as tmp:
        home = args.home or Path(tmp) / "home"
        result = run(home, seed=args.seed, fresh=args.fresh, sets=args.sets)
    atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.write(json.dumps(result["summary"], indent=1) + "\n")
    sys.stdout.write(f"written {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
