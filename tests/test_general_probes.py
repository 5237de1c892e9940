"""The general probes (knowledge questions, the base's own answers) change only with the
weights: a night's evaluation measures the base's once per home and takes the champion's
from its own evaluation, and what it takes is what measuring again would give; a kept file
that does not read back, or probes measured another way, are measured again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from candidates import Registry
from tests.conftest import run_cli
from tests.tiny_models import model_home, teach, tiny_llama

PROFILE = (
    '[training]\ndefault_profile = "quick_test"\nwrite_worse_candidates = true\n\n'
    "[training.profiles.quick_test]\nmax_steps = 3\neval_every = 3\nlearning_rate = 1e-2\n"
)


def _train(home: Path) -> tuple[str, str]:
    """A run that is evaluated (never promoted): its candidate id and its run log."""
    done = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote")
    assert "trained candidate" in done.stdout, done.stdout + done.stderr
    # stdout is a pipe here: progress comes as lines (a live bar drew nothing through
    # `| tee`), the evaluation's steps among them.
    assert ": evaluating: measuring the " in done.stdout, done.stdout
    candidate = max(c.id for c in Registry(home / "candidates").list())
    logs = sorted((home / "logs").glob("run_*.log"), key=lambda p: p.stat().st_mtime)
    return candidate, logs[-1].read_text()


def _evaluated(home: Path, candidate: str) -> dict:
    return Registry(home / "candidates").get(candidate).meta.metrics["evaluation"]["metrics"]


def _measured_again(home: Path, adapter: str | None) -> dict:
    """measure_general on the base, or on the base with `adapter`, in a fresh model."""
    from peft import PeftModel

    from common.config import load_settings
    from development import modeling, training_data
    from development.evaluate import measure_general

    settings = load_settings(home)
    model, tokenizer = modeling.load_base(settings, "cpu", for_training=False)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(home / "candidates" / adapter))
    regression = training_data.load_base_answers(settings, None)["regression"]
    return measure_general(model, tokenizer, settings, regression)


def _base_answers(home: Path) -> None:
    """Finished base answers to every shipped prompt (a random tiny model finishes none)."""
    from common.config import load_settings
    from development import training_data

    training_data.load_base_answers(
        load_settings(home), lambda prompts: [(f"Briefly: {p.lower()}", True) for p in prompts]
    )


@pytest.mark.slow  # trains and evaluates end to end
def test_general_probes_are_measured_once_per_weights(tmp_path: Path) -> None:
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE)
    _base_answers(home)
    teach(home, repeats=3)
    first, said = _train(home)
    assert "measuring base (general probes known)" not in said
    kept = list((home / "models" / "replay").glob("base-general-*.json"))
    assert len(kept) == 1
    assert (
        json.loads(kept[0].read_text())["general_nll"]
        == _evaluated(home, first)["base"]["general_nll"]
    )
    assert run_cli("promote", first, "--force", "--home", str(home)).returncode == 0

    teach(home, repeats=1)
    second, said = _train(home)
    assert "measuring base (general probes known)" in said, said
    assert "measuring champion (general probes known)" in said, said
    assert "measuring candidate (general probes known)" not in said
    scored = _evaluated(home, second)
    for name, adapter in (("base", None), ("champion", first)):
        again = _measured_again(home, adapter)
        assert scored[name]["general_nll"] == pytest.approx(again["general_nll"], rel=1e-5)
        assert scored[name]["general_facts_missed"] == again["general_facts_missed"]
    assert scored["candidate"]["general_nll"] != scored["champion"]["general_nll"]

    # A kept file cut short (a full disk) is measured again and written whole; so is one
    # that holds something else than the metrics.
    kept[0].write_text("[]")
    _, said = _train(home)
    assert "measuring base (general probes known)" not in said
    kept[0].write_text('{"general_nll": ')
    _, said = _train(home)
    assert "measuring base (general probes known)" not in said
    assert "unreadable" in said
    assert json.loads(kept[0].read_text())["general_nll"] == pytest.approx(
        scored["base"]["general_nll"], rel=1e-5
    )

    # Measured another way (a longer context): nothing kept is taken for it.
    done = run_cli(
        "train",
        "--home",
        str(home),
        "--wait",
        "--force",
        "--no-promote",
        "--set",
        "model.max_seq_length=384",
    )
    assert "trained candidate" in done.stdout, done.stdout + done.stderr
    assert len(list((home / "models" / "replay").glob("base-general-*.json"))) == 2
