"""The shipped general prompts and fact probes load from development/probe_sets/, and a
broken line there is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from development import probes


def test_the_shipped_sets_load_disjoint_and_complete() -> None:
    sets = (probes.REPLAY, probes.VALIDATION, probes.REGRESSION)
    assert [len(s) for s in sets] == [109, 8, 12]
    assert len({p for s in sets for p in s}) == sum(len(s) for s in sets)
    assert len(probes.FACT_PROBES) == 26
    _question, sentence, right, wrong = probes.FACT_PROBES[0]
    assert sentence.format(right) == "The capital of France is Paris."
    assert right not in wrong


def test_a_broken_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    general = tmp_path / "general.jsonl"
    rows = [{"set": "replay", "prompt": "Hi?"}, {"set": "validation", "prompt": "Hi?"}]
    general.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"general.jsonl:2: 'Hi\?' is already in the replay set"):
        probes.load_general_prompts(general)

    facts = tmp_path / "facts.jsonl"
    good = {"question": "Q?", "sentence": "It is {}.", "right": "a", "wrong": ["b"]}
    facts.write_text(json.dumps(good) + "\n" + json.dumps(good | {"sentence": "no slot"}) + "\n")
    with pytest.raises(ValueError, match=r"facts.jsonl:2: 'sentence' needs exactly one \{\}"):
        probes.load_fact_probes(facts)
    facts.write_text(json.dumps(good)[:-1] + "\n")
    with pytest.raises(ValueError, match=r"facts.jsonl:1: not JSON"):
        probes.load_fact_probes(facts)
