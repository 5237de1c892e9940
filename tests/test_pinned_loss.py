"""Two steps of the quick profile on a tiny random model, everything seeded: the training and
held-out losses are pinned, so a silent change in TRL, transformers or PEFT (loss on the
prompt tokens, another masking or scaling, a different LoRA init) shows here first.

If this fails after a deliberate change (a dependency bump, a new default), check that the
new numbers are explained, then update PINNED with the values the failure prints.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import data.store
from candidates import Registry
from tests.conftest import run_cli
from tests.tiny_models import model_home, teach, tiny_llama

PROFILE = (
    '[training]\ndefault_profile = "quick_test"\nreplay_fraction = 0.0\n'
    # The rows as the person wrote them: the pins watch the trainer, not the data recipe.
    "write_worse_candidates = true\ncorrection_variants = 0\n\n"
    "[training.profiles.quick_test]\nmax_steps = 2\neval_every = 1\n"
)
# [step, loss] of the SFT stage as the candidate's meta records them (transformers 5.17,
# TRL 1.14, PEFT 0.21, torch 2.13 on the CPU).
# Step 1's learning rate is 0 (warm-up), so the held-out loss moves only after step 2.
PINNED = {
    "train": [[1, 6.48904], [2, 6.49752]],
    "eval": [[0, 6.49476], [1, 6.49476], [2, 6.03245]],
}


def test_two_quick_steps_on_a_tiny_model_give_the_pinned_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Message ids place feedback into train/validation/holdout by hash: fixed ids, fixed split.
    counter = itertools.count()
    monkeypatch.setattr(data.store, "new_id", lambda prefix: f"{prefix}_{next(counter):016x}")
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE)
    teach(home)

    done = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote")

    assert "trained candidate" in done.stdout, done.stdout + done.stderr
    (candidate,) = Registry(home / "candidates").list()
    # On the CPU, "auto" trains padded batches and the meta says so.
    assert candidate.meta.config["padding_free"] is False
    assert candidate.meta.config["training"]["padding_free"] == "auto"
    seen = candidate.meta.metrics["training"]["loss_curve"]["sft"]
    for curve, pinned in PINNED.items():
        assert [step for step, _ in seen[curve]] == [step for step, _ in pinned], seen
        assert [loss for _, loss in seen[curve]] == pytest.approx(
            [loss for _, loss in pinned], rel=2e-3
        ), f"{curve} losses moved: {json.dumps(seen)}"
