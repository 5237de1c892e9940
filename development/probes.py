"""General prompts shipped with whetstone, the guard against forgetting, loaded from the JSONL
files in development/probe_sets/ (data, not code: edit them there).

Three disjoint sets, so no measurement is taken on what was trained on:

    REPLAY      the base model answers these once; the answers are mixed into training so
                the adapter keeps sounding like the base model on everything else.
    VALIDATION  base answers used as held-out loss during training (early stopping).
    REGRESSION  base answers scored by the gate: per-token NLL drift from the base.

FACT_PROBES are multiple-choice questions the embedded base model gets right (by likelihood, on
SmolLM2-135M-Instruct); a candidate that loses them has overwritten general knowledge, which
is exactly what naive training on corrections did (shared notes, "Learning is easy").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE_SETS = Path(__file__).with_name("probe_sets")
GENERAL_SETS = ("replay", "validation", "regression")

FactProbe = tuple[str, str, str, tuple[str, ...]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def _text(path: Path, number: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{number}: {key!r} must be non-empty text, got {value!r}")
    return value


def load_general_prompts(path: Path = PROBE_SETS / "general_prompts.jsonl") -> dict[str, tuple]:
    """{"replay": (...), "validation": (...), "regression": (...)} from {"set", "prompt"} rows;
    a prompt in two sets is refused (the sets must stay disjoint)."""
    sets: dict[str, list[str]] = {name: [] for name in GENERAL_SETS}
    seen: dict[str, str] = {}
    for number, row in enumerate(_read_jsonl(path), start=1):
        name = row.get("set")
        if name not in sets:
            raise ValueError(f"{path}:{number}: 'set' must be one of {GENERAL_SETS}, got {name!r}")
        prompt = _text(path, number, row, "prompt")
        if prompt in seen:
            raise ValueError(f"{path}:{number}: {prompt!r} is already in the {seen[prompt]} set")
        seen[prompt] = name
        sets[name].append(prompt)
    return {name: tuple(prompts) for name, prompts in sets.items()}


def load_fact_probes(path: Path = PROBE_SETS / "fact_probes.jsonl") -> tuple[FactProbe, ...]:
    probes = []
    for number, row in enumerate(_read_jsonl(path), start=1):
        question, sentence, right = (
            _text(path, number, row, k) for k in ("question", "sentence", "right")
        )
        wrong = row.get("wrong")
        if not isinstance(wrong, list) or not wrong or not all(isinstance(w, str) for w in wrong):
            raise ValueError(f"{path}:{number}: 'wrong' must be a list of texts, got {wrong!r}")
        if sentence.count("{}") != 1:
            raise ValueError(f"{path}:{number}: 'sentence' needs exactly one {{}} for the option")
        probes.append((question, sentence, right, tuple(wrong)))
    return tuple(probes)


_GENERAL = load_general_prompts()
REPLAY: tuple[str, ...] = _GENERAL["replay"]
VALIDATION: tuple[str, ...] = _GENERAL["validation"]
REGRESSION: tuple[str, ...] = _GENERAL["regression"]

# FACT_PROBES are (question, answer sentence with {} for the option, right option, wrong
# options) from fact_probes.jsonl ({"question", "sentence", "right", "wrong": [...]}): multiple
# choice scored by likelihood, the way lm-evaluation-harness measures knowledge. The model
# "knows" the fact when the sentence with the right option is its likeliest (total log p).
# Greedy generation was measured first and is too brittle for this: training on nothing but
# the base model's own answers (benchmarks.learning --control) flipped 5 of 26 generated
# answers into rambling, which says nothing about what the model knows.
FACT_PROBES: tuple[FactProbe, ...] = load_fact_probes()
