"""Learning benchmark: does a training profile teach the scripted person's facts, keep general
knowledge and pass the gate, over several random holdout splits?

    python -m benchmarks.learning [--repeats 4] [--profile quick_test] [--set KEY=VALUE ...]

Message ids are random, so each repeat places the same feedback into a different holdout /
validation / train split (by the hash of its id), which is what a real person's data does. A
recipe that only works for a lucky split is not a recipe: this measures how often it works.

Per repeat, in a throwaway home that links the prepared embedded model and the cached base
answers of --home (default: the test cache, .cache/test-models):

1. the scripted person's feedback (tests/scripted_person.py) goes into the store: each teaching
   question with the base model's real greedy answer, rated 1 and corrected; each general
   question rated 5 when the base answer is right, 2 when not;
2. `python -m development.train --no-promote` trains and evaluates a candidate;
3. the candidate answers the person's paraphrased probe questions (never trained on) greedily;
   recall is counted against the base model's answers to the same probes, in this process.

Prints one row per repeat and a summary (gate pass rate, recall, general facts kept, time),
and writes the same figures to benchmarks/results/learning-<hostname>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_HOME = REPO / ".cache" / "test-models"
RESULTS_DIR = REPO / "benchmarks" / "results"

log = logging.getLogger("benchmarks.learning")


def _answers(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int) -> list[str]:
    from development.modeling import generate

    prompts = [[{"role": "user", "content": q}] for q in questions]
    return [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


def _fill_store(
    home: Path, teaching: dict[str, str], general: dict[str, str], control: bool = False
) -> None:
    from common.config import load_settings
    from data.store import Store
    from tests.scripted_person import FACTS, GENERAL

    store = Store(load_settings(home).db_url)
    try:
        for fact in FACTS:
            for question in fact.questions:
                conversation = store.create_conversation()
                store.add_message(conversation.id, "user", question)
                answer = store.add_message(
                    conversation.id, "assistant", teaching[question], finish_reason="stop"
                )
                if control:  # nothing to learn: the "correction" is the base's own answer
                    store.add_feedback(answer.id, rating=1, correction=teaching[question])
                else:
                    store.add_feedback(answer.id, rating=1, correction=fact.answer)
        for question, keyword in GENERAL:
            conversation = store.create_conversation()
            store.add_message(conversation.id, "user", question)
            answer = store.add_message(
                conversation.id, "assistant", general[question], finish_reason="stop"
            )
            store.add_feedback(answer.id, rating=5 if keyword in answer.content.lower() else 2)
    finally:
        store.close()


def _recall(answers: list[str]) -> int:
    from tests.scripted_person import FACTS

    keywords = [fact.keyword for fact in FACTS for _ in fact.probes]
    return sum(k in a.lower() for k, a in zip(keywords, answers, strict=True))


def run(
    source_home: Path, repeats: int, profile: str, sets: list[str], control: bool = False
) -> dict[str, Any]:
    from peft import PeftModel

    from candidates import Registry
    from common.config import load_settings
    from common.home import Home
    from development import modeling, training_data
    from production.model.base_model import prepare_embedded
    from tests.scripted_person import FACTS, GENERAL

    model_dir = prepare_embedded(Home(source_home), show_progress=False)
    settings = load_settings(source_home)
    model, tokenizer = modeling.load_base(settings, "cpu", for_training=False)
    if not training_data.replay_cache_file(settings).is_file():
        training_data.load_base_answers(
            settings, lambda prompts: modeling.base_answers(model, tokenizer, settings, prompts)
        )
    replay_dir = training_data.replay_cache_file(settings).parent

    teaching_q = [q for fact in FACTS for q in fact.questions]
    general_q = [q for q, _ in GENERAL]
    probes = [p for fact in FACTS for p in fact.probes]
    teaching = dict(zip(teaching_q, _answers(model, tokenizer, teaching_q, 24), strict=True))
    general = dict(zip(general_q, _answers(model, tokenizer, general_q, 32), strict=True))
    base_recall = _recall(_answers(model, tokenizer, probes, 32))

    rows = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory(prefix="whetstone-learning-") as tmp:
            home = Path(tmp) / "home"
            (home / "models").mkdir(parents=True)
            (home / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
            (home / "models" / "replay").symlink_to(replay_dir, target_is_directory=True)
            _fill_store(home, teaching, general, control)
            started = time.monotonic()
            cmd = [sys.executable, "-m", "development.train", "--home", str(home)]
            cmd += ["--profile", profile, "--no-promote"]
            for item in sets:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            seconds = time.monotonic() - started
            if proc.returncode != 0:
                raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            (candidate,) = Registry(home / "candidates").list()
            meta = candidate.meta
            evaluation = meta.metrics["evaluation"]
            cand = evaluation["metrics"]["candidate"]
            base = evaluation["metrics"]["base"]
            tuned = PeftModel.from_pretrained(model, str(candidate.path))
            recall = _recall(_answers(tuned, tokenizer, probes, 32))
            model = tuned.unload()  # back to the plain base for the next repeat
            sft = meta.metrics["training"]["stages"][0]
            row = {
                "repeat": repeat,
                "decision": evaluation["decision"],
                "rule": evaluation["rule"],
                "holdout_items": cand["holdout_items"],
                "holdout_nll": [round(base["holdout_nll"], 3), round(cand["holdout_nll"], 3)],
                "right_answers": [base.get("correction_accuracy"), cand.get("correction_accuracy")],
                "general_facts": [base["general_facts"], cand["general_facts"]],
                "missed": cand.get("general_facts_missed"),
                "general_nll_drift": round(cand["general_nll"] / base["general_nll"] - 1, 3),
                "recall": recall,
                "best_step": sft.get("best_step"),
                "steps": sft.get("steps"),
                "seconds": round(seconds, 1),
            }
            rows.append(row)
            log.info("%s", json.dumps(row))
    total = len(probes)
    promoted = sum(r["decision"] == "promote" for r in rows)
    summary = {
        "profile": profile,
        "sets": sets,
        "repeats": repeats,
        "promoted": promoted,
        "base_recall": f"{base_recall}/{total}",
        "recall": [f"{r['recall']}/{total}" for r in rows],
        "general_facts_lost": [r["general_facts"][0] - r["general_facts"][1] for r in rows],
        "rules": [r["rule"] for r in rows],
        "mean_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 1),
    }
    return {
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "summary": summary,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=DEFAULT_MODEL_HOME)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--profile", default="quick_test")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--control",
        action="store_true",
        help="corrections are the base's own answers: what training alone moves",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args.home, args.repeats, args.profile, args.sets, args.control)
    for row in result["rows"]:
        sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.write(json.dumps(result["summary"], indent=1) + "\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    day = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"learning-{platform.node()}-{day}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"written {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
