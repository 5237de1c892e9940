"""The recipe search (orchestrator.experiments) on a real store, registry and Optuna storage:
trials ask the study and queue ordinary runs with their knobs, a trial whose run was stopped
is asked again with the same knobs, the best trial that beats the current recipe is adopted
(and only within the gate's general-knowledge bounds), the adopted recipe reaches the
settings of the next run of that profile, reset goes back and closes the study, trial
candidates are never promoted and are pruned apart. The trials' training itself runs in
tests/test_experiments_daemon.py (slow).

Here the trial jobs' outcome is what the job writes: a candidate folder whose meta.json holds
metrics.trial, and the run's status.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from candidates import Registry
from common.config import ConfigError, load_settings, parse_sets
from common.fs import pid_alive
from data.store import Store
from orchestrator import experiments
from orchestrator.promotion import PromotionRefused, promote
from orchestrator.schedule import EXPERIMENT_TRIGGER, enqueue_on_feedback
from tests.conftest import REPO, kill_training_processes, run_cli
from tests.scripted_person import store_corrections, taught
from tests.test_daemon import DaemonProcess, wait_for
from tests.test_registry import make_meta, write_fake_adapter
from tests.tiny_models import model_home, tiny_llama

# Message ids are random, so the split is too: 30% validation of 40 items leaves far more than
# the 2 needed (10% left only 1 about once in twelve runs).
CONFIG = """
[training]
validation_fraction = 0.3

[experiments]
enabled = "on"
profile = "quick_test"
max_trials = 3
min_validation_items = 2
"""


@pytest.fixture
def settings(home: Path):
    (home / "config.toml").write_text(CONFIG)
    store_corrections(home, taught(40))
    return load_settings(home)


def _finish_trial(settings, store: Store, run_id: str, nll: float, *, lost: int = 0) -> str:
    """What the trial job leaves: a succeeded run and a trial candidate with its score."""
    registry = Registry(settings.paths.candidates_dir)
    cid = registry.new_id()
    constraints = {
        "general_nll_drift": -0.01,
        "general_facts_lost": float(lost - settings.gate.max_general_facts_lost),
    }
    score = {
        "validation_nll": nll,
        "constraints": constraints,
        "fits_gate": all(c <= 0 for c in constraints.values()),
    }
    registry.create(
        make_meta(
            cid, base_model=settings.model.base_model, metrics={"trial": score}, status="trial"
        ),
        lambda folder: write_fake_adapter(folder, base_model=settings.model.base_model),
    )
    store.update_run(run_id, status="succeeded", candidate_id=cid)
    return cid


def _trial_params(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if "=" in a)


def test_a_trial_is_an_ordinary_run_whose_knobs_reach_its_settings(settings) -> None:
    with Store(settings.db_url) as store:
        run_id, number, args = experiments.start_trial(settings, store)
        run = store.get_run(run_id)
    assert (number, run.trigger, run.profile, run.status) == (
        0,
        EXPERIMENT_TRIGGER,
        "quick_test",
        "queued",
    )
    assert args[:2] == ["--trial", args[1]] and args[1].endswith(":0")
    # Trial 0 is the baseline: the config's own values.
    sets = [a for a in args[2:] if a != "--set"]
    resolved = load_settings(settings.paths.root, parse_sets(sets))
    profile = resolved.profile("quick_test")
    config = settings.profile("quick_test")
    assert (profile.learning_rate, profile.max_steps) == (config.learning_rate, config.max_steps)
    assert profile.lora_r == (config.lora_r or settings.lora.r)
    assert resolved.lora.alpha / profile.lora_r == settings.lora.alpha / settings.lora.r


def test_trials_do_not_reset_the_every_n_trigger(settings) -> None:
    tuned = load_settings(settings.paths.root, {"schedule": {"every_n_feedback": 30}})
    with Store(settings.db_url) as store:
        experiments.start_trial(tuned, store)
        assert enqueue_on_feedback(tuned, store) is not None  # 40 new items since no real run


def test_too_little_validation_data_says_which_setting(home: Path) -> None:
    (home / "config.toml").write_text(
        CONFIG.replace("min_validation_items = 2", "min_validation_items = 50")
    )
    store_corrections(home, taught(10))
    settings = load_settings(home)
    with (
        Store(settings.db_url) as store,
        pytest.raises(experiments.NoTrial, match="min_validation_items"),
    ):
        experiments.start_trial(settings, store)
        assert store.list_runs() == []


def test_a_stopped_trial_is_asked_again_with_the_same_knobs_then_the_best_is_adopted(
    settings,
) -> None:
    registry = Registry(settings.paths.candidates_dir)
    with Store(settings.db_url) as store:
        run0, _, args0 = experiments.start_trial(settings, store)
        store.update_run(run0, status="cancelled", reason="the person is chatting")
        lines = experiments.settle(settings, store, registry)
        assert any("stopped" in line and "asked again" in line for line in lines), lines

        again, number, args_again = experiments.start_trial(settings, store)
        assert number == 1 and _trial_params(args_again) == _trial_params(args0)
        _finish_trial(settings, store, again, 1.50)  # the baseline
        experiments.settle(settings, store, registry)
        assert experiments.current_recipe(settings) is None  # nothing better yet

        worse_facts, _, _ = experiments.start_trial(settings, store)
        _finish_trial(settings, store, worse_facts, 0.90, lost=5)  # best NLL, forgets facts
        experiments.settle(settings, store, registry)
        assert experiments.current_recipe(settings) is None

        summary = experiments.summary(settings)
        assert summary["study"]["finished"] == 2
        states = [t["state"] for t in summary["study"]["trials"]]
        assert states == ["fail", "complete", "complete"]
        assert summary["study"]["trials"][2]["fits_gate"] is False

        good, _, good_args = experiments.start_trial(settings, store)
        _finish_trial(settings, store, good, 1.20)
        lines = experiments.settle(settings, store, registry)
        assert any("recipe adopted" in line for line in lines), lines
        with pytest.raises(experiments.NoTrial, match="ran its 3 trials"):
            experiments.start_trial(settings, store)

    recipe = experiments.current_recipe(settings)
    assert recipe["validation_nll"] == 1.20 and recipe["baseline_validation_nll"] == 1.50
    # The next run of that profile gets the recipe's knobs, under its own --set items.
    sets = experiments.recipe_sets(settings, "quick_test")
    assert sorted(sets) == sorted(a for a in good_args[2:] if a != "--set")
    assert experiments.recipe_sets(settings, "standard") == []
    assert "adopted" in experiments.summary(settings)["line"]

    dropped = experiments.reset_recipe(settings)
    assert dropped["trial"] == recipe["trial"]
    assert experiments.current_recipe(settings) is None
    history = json.loads(settings.paths.recipe_file.read_text())["history"]
    assert history[-1]["dropped_because"] == "reset by the person"
    with Store(settings.db_url) as store, pytest.raises(experiments.NoTrial, match="closed"):
        experiments.start_trial(settings, store)


def test_a_failed_trial_is_not_asked_again(settings) -> None:
    registry = Registry(settings.paths.candidates_dir)
    with Store(settings.db_url) as store:
        run0, _, _ = experiments.start_trial(settings, store)
        store.update_run(run0, status="failed", error="CUDA out of memory")
        (line,) = experiments.settle(settings, store, registry)
        assert "failed: CUDA out of memory" in line
        _, number, args1 = experiments.start_trial(settings, store)
        assert number == 1 and "--trial" in args1


def test_trial_candidates_are_never_promoted_and_are_pruned_apart(settings) -> None:
    registry = Registry(settings.paths.candidates_dir)
    with Store(settings.db_url) as store:
        trials = []
        for _ in range(3):
            run = store.create_run("quick_test", EXPERIMENT_TRIGGER)
            trials.append(_finish_trial(settings, store, run.id, 1.0))
        for cid in trials[:1]:
            with pytest.raises(PromotionRefused, match="recipe trial"):
                promote(settings, store, registry, cid, force=True)
    real = registry.new_id()
    registry.create(
        make_meta(real, base_model=settings.model.base_model),
        lambda folder: write_fake_adapter(folder, base_model=settings.model.base_model),
    )
    removed = registry.retain(1, keep_trials=1)
    assert sorted(removed) == sorted(trials[:2])
    assert {c.id for c in registry.list()} == {trials[2], real}


def test_a_damaged_recipe_file_is_named_and_kept(settings) -> None:
    settings.paths.recipe_file.write_text("{not json")
    with pytest.raises(ConfigError, match="recipe.json is not a recipe file"):
        experiments.recipe_sets(settings, "quick_test")
    assert settings.paths.recipe_file.read_text() == "{not json"
    assert "recipe.json is not a recipe file" in experiments.summary(settings)["error"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning_rate_scale", "[2.0, 1.0]", "0 < low <= high"),
        ("replay_fraction", "[0.5, 1.0]", "share below 1"),
        ("lora_ranks", "[0, 8]", "positive"),
        ("profile", '"nope"', "experiments.profile = 'nope' is not a profile"),
    ],
)
def test_bad_experiment_settings_are_refused_by_name(
    home: Path, key: str, value: str, message: str
) -> None:
    (home / "config.toml").write_text(f"[experiments]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(home)


# --- through the daemon, on a tiny model -------------------------------------------------
# The daemon, its API worker and every trial are the real processes; a tiny random model
# (tests/tiny_models.py) keeps each trial to seconds. Learning itself is test_learning's.

SEARCH = """
[daemon]
poll_s = 0.5
stop_timeout_s = 30

[schedule]
every_n_feedback = 0
idle_before_training_s = 0

[training]
validation_fraction = 0.2
write_worse_candidates = true

[training.profiles.quick_test]
learning_rate = 1e-6
max_steps = 4
eval_every = 4

[experiments]
enabled = "on"
profile = "quick_test"
max_trials = 2
min_validation_items = 2
min_improvement = 0.0
pause_before_nightly_s = 0
# The baseline (lr 1e-6) barely moves; every other trial learns: the adoption is certain.
learning_rate_scale = [300.0, 1000.0]
max_steps_scale = [1.0]
lora_ranks = [8]
"""


def _runs(settings) -> list:
    with Store(settings.db_url) as store:
        return store.list_runs(limit=50)


@pytest.mark.slow
def test_the_daemon_runs_trials_yields_to_chat_and_the_next_run_uses_the_recipe(
    tmp_path: Path,
) -> None:
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "tiny"), more=SEARCH)
    store_corrections(home, taught(48))
    settings = load_settings(home)
    daemon = DaemonProcess(home)
    try:
        _search_through_the_daemon(home, settings, daemon.wait_ready())
    finally:
        daemon.stop()
        kill_training_processes(home)


def _search_through_the_daemon(home: Path, settings, daemon: DaemonProcess) -> None:

    def training_trial():
        runs = [r for r in _runs(settings) if r.trigger == EXPERIMENT_TRIGGER]
        running = [r for r in runs if r.status == "running"]
        return running and (running[0].progress or {}).get("stage") == "sft" and running[0]

    first = wait_for("a trial training", training_trial, timeout=300)
    asked = time.monotonic()
    answer = httpx.post(
        f"{daemon.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4},
        timeout=120,
    )
    answer.raise_for_status()

    def stopped():
        with Store(settings.db_url) as store:
            run = store.get_run(first.id)
        return run if run.status != "running" else None

    run = wait_for("the trial stopped", stopped, timeout=60)
    stopped_after = time.monotonic() - asked
    assert run.status == "cancelled", (run.status, run.error, daemon.output()[-3000:])
    assert "chatting" in run.reason
    assert stopped_after < 15, stopped_after  # the trial guard looks twice a second
    # ...and the trial's process is gone, leaving the device to the chat.
    wait_for(
        "the trial's process exited",
        lambda: not pid_alive(first.pid, "development.train"),
        timeout=60,
    )

    def adopted():
        time.sleep(2)  # the trials need the CPU more than this loop
        found = experiments.summary(settings)
        study = found.get("study") or {}
        return found if study.get("finished") == 2 and found.get("recipe") else None

    wait_for("two trials and an adopted recipe", adopted, timeout=900)
    found = json.loads(run_cli("recipe", "--home", str(home), "--json").stdout)
    trials = found["study"]["trials"]
    assert [t["state"] for t in trials] == ["fail", "complete", "complete"], trials
    assert trials[0]["params"] == trials[1]["params"] and trials[1]["baseline"]
    assert (
        found["recipe"]["trial"] == 2
        and found["recipe"]["validation_nll"] < trials[1]["validation_nll"]
    )
    status = run_cli("status", "--home", str(home))
    assert "recipe" in status.stdout and "adopted" in status.stdout, status.stdout
    api = httpx.get(f"{daemon.url}/v1/status", timeout=30).json()
    assert api["recipe"]["recipe"]["trial"] == 2
    registry = Registry(settings.paths.candidates_dir)
    assert registry.current_id() is None, "a trial must never be served"
    assert daemon.terminate() == 0
    _next_run_uses(home, registry, found["recipe"]["params"])


def _next_run_uses(home: Path, registry: Registry, params: dict) -> None:
    # The next run of the searched profile trains with the adopted knobs.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "development.train",
            "--home",
            str(home),
            "--profile",
            "quick_test",
            "--force",
            "--no-evaluate",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    newest = registry.list()[-1]
    assert newest.meta.status != "trial"
    assert newest.meta.config["recipe"]["trial"] == 2
    profile = newest.meta.config["profile_settings"]
    assert profile["learning_rate"] == pytest.approx(params["learning_rate"])
    assert profile["lora_r"] == params["lora_r"]
    assert newest.meta.config["training"]["replay_fraction"] == pytest.approx(
        params["replay_fraction"]
    )
