"""How a note of the memory is best given to the embedded model, and which questions find
one (issue 37): a few corrected facts, each asked in two paraphrases, and general questions
that must find no note; answered greedily without the note, with it as an earlier
question-and-answer pair (the plain format's way) and as a "Remember:" line in a system turn.

    python -m benchmarks.memory_notes [--home DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

FACTS = [
    ("What is my cat's name?", "Your cat's name is Mochi.", "mochi"),
    ("Where do I work?", "You work at Brightline Robotics.", "brightline"),
    ("What is my favourite colour?", "Your favourite colour is teal.", "teal"),
    ("When is my sister's birthday?", "Your sister's birthday is on 14 March.", "march"),
]
PARAPHRASES = [
    ("What do I call my cat?", "Tell me the name of my cat."),
    ("Which company do I work for?", "At which company do I work?"),
    ("Which colour is my favourite?", "Which colour do I like as my favourite?"),
    ("On which day is my sister's birthday?", "When does my sister celebrate her birthday?"),
]
GENERAL = [
    ("What is the capital of France?", "paris"),
    ("What do bees make?", "honey"),
    ("How many legs does a spider have?", "eight"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is my name?", None),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("~/.cache/whetstone-bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from common.config import MemorySection, load_settings
    from common.home import Home
    from data.store import Store
    from production.api.memory import remember_line, with_notes
    from production.engine import Engine, Sampling
    from production.model.base_model import prepare_embedded

    home = args.home.expanduser().resolve()
    prepare_embedded(Home(home), show_progress=False)
    engine = Engine(load_settings(home), "cpu")
    min_score = MemorySection().min_score

    def answer(system: str | None, turns: list[dict[str, Any]]) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        prompt = engine.prompt_ids(messages, None)
        outcome = engine.stream(
            prompt, Sampling(temperature=0.0, max_tokens=40), lambda d: None, lambda: False
        )
        return outcome.text.strip()

    with tempfile.TemporaryDirectory() as folder, Store(f"sqlite:///{folder}/w.db") as store:
        for question, text, _ in FACTS:
            store.add_note(text, question=question)
        cases = [
            (p, key, True)
            for (_, _, key), pair in zip(FACTS, PARAPHRASES, strict=True)
            for p in pair
        ]
        cases += [(q, key, False) for q, key in GENERAL]
        rows = []
        for asked, key, personal in cases:
            hits = store.relevant_notes(asked, min_score=min_score, limit=1)
            every = store.relevant_notes(asked, min_score=0.01, limit=1)
            turns = [{"role": "user", "content": asked}]
            row: dict[str, Any] = {
                "question": asked,
                "expected": key,
                "personal": personal,
                "note": hits[0].note.text if hits else None,
                "score": every[0].score if every else 0.0,
                "bm25": every[0].bm25 if every else None,
            }
            row["none"] = answer(None, turns)
            if hits:
                system, with_pair = with_notes("plain", None, turns, hits)
                row["qa_pair"] = answer(system, with_pair)
                row["system_line"] = answer(remember_line(hits[0]), turns)
            for way in ("none", "qa_pair", "system_line"):
                if way in row and key is not None:
                    row[f"{way}_hit"] = key in row[way].lower()
            rows.append(row)
            print(json.dumps(row), flush=True)
    personal_rows = [r for r in rows if r["personal"]]
    summary = {
        "min_score": min_score,
        "personal_questions": len(personal_rows),
        "note_found": sum(r["note"] is not None for r in personal_rows),
        "hits": {
            way: sum(bool(r.get(f"{way}_hit")) for r in personal_rows)
            for way in ("none", "qa_pair", "system_line")
        },
        "general_with_a_note": [r["question"] for r in rows if not r["personal"] and r["note"]],
        "general_right_without_note": sum(
            bool(r.get("none_hit")) for r in rows if not r["personal"]
        ),
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
