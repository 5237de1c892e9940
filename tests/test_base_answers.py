"""The replay cache (the base model's answers to the shipped general prompts): generated once,
all prompts in one generation call, with progress per decode step instead of a stage stuck
at "step 0 of 0", and preparable ahead of the first training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common.config import load_settings
from development import modeling, probes, training_data
from tests.tiny_models import model_home, tiny_llama

REPO = Path(__file__).resolve().parent.parent


def test_the_cache_is_made_in_one_call_keeps_finished_answers_per_set_and_is_reused(
    tmp_path: Path,
) -> None:
    settings = load_settings(model_home(tmp_path / "home", tmp_path / "no-model-needed"))
    calls: list[list[str]] = []

    def answer(prompts: list[str]) -> list[tuple[str, bool]]:
        calls.append(prompts)
        # Every third answer ran into the token limit; one finished answer is blank.
        return [(f"answer to {p}" if i else "  ", i % 3 != 2) for i, p in enumerate(prompts)]

    sets = training_data.load_base_answers(settings, answer)
    everything = [*probes.REPLAY, *probes.VALIDATION, *probes.REGRESSION]
    assert calls == [everything]
    kept = {p for i, p in enumerate(everything) if i % 3 != 2 and i}
    for name, prompts in (
        ("replay", probes.REPLAY),
        ("validation", probes.VALIDATION),
        ("regression", probes.REGRESSION),
    ):
        expected = [{"prompt": p, "answer": f"answer to {p}"} for p in prompts if p in kept]
        assert sets[name] == expected
    # The next run reads the file and generates nothing.
    assert training_data.load_base_answers(settings, None) == sets
    assert len(calls) == 1


def test_generation_reports_every_decode_step_and_answers_as_without_progress(
    tmp_path: Path,
) -> None:
    folder = tiny_llama(tmp_path / "tiny", hidden=64, layers=2)
    settings = load_settings(model_home(tmp_path / "home", folder))
    model, tokenizer = modeling.load_base(settings, "cpu", for_training=False)
    prompts = [[{"role": "user", "content": q}] for q in probes.REPLAY[:5]]
    steps: list[tuple[int, int]] = []

    with_progress = modeling.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=12,
        batch_size=2,
        progress=lambda step, total: steps.append((step, total)),
    )
    plain = modeling.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert with_progress == [
        modeling.Generated(g.text, g.tokens, g.finished, w.seconds)
        for g, w in zip(plain, with_progress, strict=True)
    ]
    # Three batches of at most 12 steps: the bound is 36, and each step is reported once,
    # counting on from where the previous batch's bound ended.
    assert {total for _, total in steps} == {36}
    done = [step for step, _ in steps]
    assert done == sorted(set(done)) and done[0] == 1 and done[-1] <= 36
    assert {(step - 1) // 12 for step in done} == {0, 1, 2}


def test_the_cache_can_be_prepared_before_the_first_run(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "tiny", hidden=64, layers=2)
    home = model_home(tmp_path / "home", folder)
    command = [sys.executable, "-m", "development.base_answers", "--home", str(home), "--quiet"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(done.stdout.strip())
    assert path == training_data.replay_cache_file(load_settings(home))
    assert set(json.loads(path.read_text())["sets"]) == {"replay", "validation", "regression"}
    written = path.stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and path.stat().st_mtime_ns == written
    assert "loaded" not in again.stderr  # the model is not even loaded a second time
