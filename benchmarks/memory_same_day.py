"""A quick proxy of the week's same-day recall with the memory on (issue 37): the week's facts,
each taught once (one of its teaching questions, one of its corrections as the person types
it, chosen by --seed), become notes in a fresh store; each fact's probe wordings are asked of
the base model with the note the product's retrieval finds, given as the plain format gives it
(an earlier question-and-answer pair). Counts the probes whose own note was found and those
answered right; "second_person" rewrites the note's I/my/me into you/your first.

    python -m benchmarks.memory_same_day [--home H] [--seeds 0,1]

No adapter serves and no other note competes, so it bounds what the week can reach from
above; a few minutes on two cores. Writes benchmarks/results/memory-same-day-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import week_person as person

RESULTS = Path(__file__).resolve().parent / "results"
_SWAP = {"i": "you", "i'm": "you're", "me": "you", "my": "your", "mine": "yours", "am": "are"}
_FIRST_PERSON = re.compile(r"\b(I'm|I|me|my|mine|am)\b", re.IGNORECASE)


def second_person(text: str) -> str:
    """ "My team is Benfica." -> "Your team is Benfica." (a note said by the assistant)."""

    def swap(match: re.Match[str]) -> str:
        word = _SWAP[match.group(0).lower()]
        return word.capitalize() if match.start() == 0 else word

    return _FIRST_PERSON.sub(swap, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache" / "whetstone-bench")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)

    from common.config import MemorySection, load_settings
    from common.home import Home
    from data.store import Store
    from production.api.memory import with_notes
    from production.engine import Engine, Sampling
    from production.model.base_model import prepare_embedded

    prepare_embedded(Home(args.home), show_progress=False)
    engine = Engine(load_settings(args.home), "cpu")
    min_score = MemorySection().min_score
    greedy = Sampling(temperature=0.0, max_tokens=24)

    def answer(turns: list[dict[str, Any]]) -> str:
        prompt = engine.prompt_ids(turns, None)
        return engine.stream(prompt, greedy, lambda d: None, lambda: False).text

    results: dict[str, Any] = {"min_score": min_score, "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = random.Random(seed)
        taught = [(f, rng.choice(f.questions), rng.choice(f.corrections)) for f in person.FACTS]
        for variant in ("as_typed", "second_person"):
            rows = []
            folder = tempfile.mkdtemp(prefix="memory-same-day-")
            with Store(f"sqlite:///{folder}/m.db") as store:
                for _, question, correction in taught:
                    text = correction if variant == "as_typed" else second_person(correction)
                    store.add_note(text, question=question)
                for fact, _, _ in taught:
                    for probe in fact.probes:
                        hits = store.relevant_notes(probe, min_score=min_score, limit=1)
                        own = bool(hits) and fact.keyword in hits[0].note.text.lower()
                        turns = [{"role": "user", "content": probe}]
                        _, given = with_notes("plain", None, turns, hits)
                        said = answer(given)
                        rows.append(
                            {
                                "probe": probe,
                                "note": hits[0].note.text if hits else None,
                                "own_note": own,
                                "answer": said,
                                "right": fact.keyword in said.lower(),
                            }
                        )
            shutil.rmtree(folder, ignore_errors=True)
            run = {
                "seed": seed,
                "variant": variant,
                "probes": len(rows),
                "own_note_found": sum(r["own_note"] for r in rows),
                "right": sum(r["right"] for r in rows),
                "right_with_own_note": sum(r["right"] and r["own_note"] for r in rows),
                "rows": rows,
            }
            results["runs"].append(run)
            print(
                f"seed {seed} {variant:>13}: own note found {run['own_note_found']}/{len(rows)}, "
                f"right {run['right']}/{len(rows)} ({run['right_with_own_note']} with its note)",
                flush=True,
            )
    out = RESULTS / f"memory-same-day-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
