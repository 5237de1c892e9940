"""`training.padding_free`: "on" where TRL's own trainer runs is refused by name before
anything loads (without flash-attn padding-free batches were 1.4-1.5x slower:
benchmarks/gpu_suite.py). That "auto" trains padded batches on the CPU and records it in the
meta is checked by tests/test_pinned_loss.py."""

from __future__ import annotations

from pathlib import Path

from data.store import Store
from tests.conftest import run_cli
from tests.tiny_models import model_home, teach, tiny_llama

PROFILE = (
    '[training]\ndefault_profile = "short"\npadding_free = "{choice}"\n'
    "write_worse_candidates = true\n\n"
    "[training.profiles.short]\nmax_steps = 2\nbatch_size = 8\nlearning_rate = 1e-3\n"
    "preference_steps = 0\n"
)


def test_padding_free_on_without_unsloth_is_refused_by_name(tmp_path: Path) -> None:
    home = model_home(
        tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE.format(choice="on")
    )
    teach(home)
    done = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote")
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # the CLI wraps its message to the terminal width
    assert "training.padding_free = 'on' needs the unsloth backend" in said, said
    assert list((home / "candidates").glob("*/meta.json")) == []
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        assert store.count_feedback_since(None) == 24  # every correction is still stored


def test_an_unknown_padding_free_value_is_named(tmp_path: Path) -> None:
    home = model_home(
        tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=PROFILE.format(choice="yes")
    )
    done = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote")
    assert done.returncode != 0
    assert "padding_free" in done.stderr, done.stderr
