"""A night's run continues the champion's adapter (training.start_from = "champion"): it
starts from the weights being served, not from a fresh LoRA, and trains on the new feedback
plus a replay of the earlier; a champion of another LoRA shape, one whose general drift
has used up half the gate's bound, or one whose last continuation the gate refused for
general drift, is not built on, nor is there anything to continue when nothing is new; the
candidate's meta says which it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from candidates import Registry, update_meta
from tests.conftest import run_cli
from tests.tiny_models import model_home, teach, tiny_llama

# One real step (the first is warm-up at learning rate 0); the second run's learning rate
# is so small that its adapter is, to float precision, the one it started from.
PROFILE = (
    '[training]\ndefault_profile = "quick_test"\nreplay_fraction = 0.0\n'
    "write_worse_candidates = true\n\n"
    "[training.profiles.quick_test]\nmax_steps = 3\neval_every = 3\nlearning_rate = 1e-2\n"
)


def _lora(home: Path, candidate_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(home / "candidates" / candidate_id / "adapter_model.safetensors"))


def _judged(home: Path, candidate_id: str, drift: float, **verdict: str) -> None:
    """Record in a candidate's meta that the gate measured its general-probe NLL `drift`
    over the base's, and its `verdict` (decision, rule), as evaluate.py writes them."""
    folder = home / "candidates" / candidate_id
    meta = Registry(home / "candidates").get(candidate_id).meta
    scored = {"candidate": {"general_nll": 2.0 * (1 + drift)}, "base": {"general_nll": 2.0}}
    evaluation = {"metrics": scored, **verdict}
    update_meta(folder, metrics={**meta.metrics, "evaluation": evaluation})


def _train(home: Path, *sets: str) -> str:
    args = [arg for item in sets for arg in ("--set", item)]
    done = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote", *args)
    assert "trained candidate" in done.stdout, done.stdout + done.stderr
    return max(c.id for c in Registry(home / "candidates").list())


@pytest.mark.slow  # trains and evaluates end to end
def test_the_next_run_continues_the_champion_and_a_champion_of_another_shape_is_not_forced_in(
    tmp_path: Path,
) -> None:
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE)
    teach(home, repeats=3)
    first = _train(home)
    meta = Registry(home / "candidates").get(first).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"] == "no champion yet"
    assert run_cli("promote", first, "--force", "--home", str(home)).returncode == 0

    # Judged with general-probe NLL 2% over the base's: under half the gate's 5% bound.
    _judged(home, first, drift=0.02)
    teach(home, repeats=1)  # new feedback
    second = _train(home, "training.profiles.quick_test.learning_rate=1e-9")
    meta = Registry(home / "candidates").get(second).meta
    assert meta.config["started_from"] == first and meta.config["fresh_because"] is None
    counts = meta.data["counts"]
    # The new rows, and as many earlier ones (training.earlier_rows_per_new = 1).
    assert 0 < counts["earlier_sft_rows"] <= counts["sft_rows"] - counts["earlier_sft_rows"]
    champion, continued = _lora(home, first), _lora(home, second)
    assert set(champion) == set(continued)
    assert any(t.abs().max() > 0 for k, t in champion.items() if "lora_B" in k)
    for name, tensor in champion.items():
        torch.testing.assert_close(continued[name].float(), tensor.float(), rtol=0, atol=1e-6)

    # That continuation refused for general drift: the next night does not continue the
    # champion again (it would start from where the drift came from) but trains fresh.
    _judged(home, second, drift=0.13, decision="reject", rule="general_regression")
    refused_after = _train(home)
    meta = Registry(home / "candidates").get(refused_after).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"] == (
        f"the last run that continued the champion {first}, {second}, was refused for general "
        "drift (+13.0% over the base): continuing again would start from where that drift "
        "came from"
    )
    assert meta.data["counts"]["earlier_sft_rows"] == 0
    # Refused for another reason (here: too few held-out items), it is continued again.
    _judged(home, second, drift=0.13, decision="reject", rule="holdout_size")
    again = _train(home)
    assert Registry(home / "candidates").get(again).meta.config["started_from"] == first

    # Another rank: a fresh adapter, and the meta says why.
    third = _train(home, "training.profiles.quick_test.lora_r=8")
    meta = Registry(home / "candidates").get(third).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"] == "the champion's LoRA r is 16, not 8"
    assert meta.data["counts"]["earlier_sft_rows"] == 0

    # start_from = "base": a fresh adapter on all feedback, even with a champion of this shape.
    fourth = _train(home, "training.start_from=base")
    meta = Registry(home / "candidates").get(fourth).meta
    assert meta.config["fresh_because"] == "training.start_from is 'base'"

    # A champion that drifted past half the gate's bound is not built on: continuing adds
    # drift to what it carries, and the next night would be refused for it.
    _judged(home, first, drift=0.04)
    fifth = _train(home)
    meta = Registry(home / "candidates").get(fifth).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"].startswith(
        "the champion's general-probe NLL is +4.0% over the base's, past +2.5%"
    )

    # What the champion's run held out, a gate has judged since: new to train on (the
    # rolling holdout), so the next run continues the champion on it.
    assert run_cli("promote", second, "--force", "--home", str(home)).returncode == 0
    _judged(home, second, drift=0.0)
    held_out = Registry(home / "candidates").get(second).meta.data["message_ids"]
    sixth = _train(home)
    meta = Registry(home / "candidates").get(sixth).meta
    assert meta.config["started_from"] == second
    released = set(held_out["validation"]) | set(held_out["holdout"])
    assert released and released <= set(meta.data["message_ids"]["train"])

    # A forced run with nothing new since the champion: there is nothing to continue on, so
    # it retrains on all feedback rather than skip what the person asked for.
    assert run_cli("promote", sixth, "--force", "--home", str(home)).returncode == 0
    seventh = _train(home)
    meta = Registry(home / "candidates").get(seventh).meta
    assert meta.config["started_from"] is None
    assert meta.config["fresh_because"] == f"nothing new to train on since the champion {sixth}"
    assert meta.data["counts"]["sft_rows"] > 0 and meta.data["counts"]["earlier_sft_rows"] == 0


@pytest.mark.slow  # trains and evaluates end to end
def test_a_continuation_that_only_made_the_held_out_feedback_less_likely_writes_no_candidate(
    tmp_path: Path,
) -> None:
    """Every checkpoint worse on the person's held-out feedback than the champion it started
    from: the run ends skipped, saying so, with no candidate for the gate to be fooled by
    (the seed-1 week promoted such a night, and its facts bled into each other)."""
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE)
    teach(home, repeats=3)
    first = _train(home)
    assert run_cli("promote", first, "--force", "--home", str(home)).returncode == 0
    # Enough new feedback that its validation share (what the first run's gate has not yet
    # judged) can decide: training.min_person_validation_rows.
    teach(home, repeats=15)

    wild = [
        "training.profiles.quick_test.learning_rate=1.0",
        "training.write_worse_candidates=false",
    ]
    sets = [arg for item in wild for arg in ("--set", item)]
    done = run_cli("train", "--home", str(home), "--wait", "--force", *sets)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped: no candidate: every checkpoint was worse on the person's held-out" in (
        " ".join(done.stdout.split())
    )
    assert "than the champion it started from" in " ".join(done.stdout.split())
    assert [c.id for c in Registry(home / "candidates").list()] == [first]
    assert Registry(home / "candidates").current_id() == first
